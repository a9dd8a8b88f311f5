"""RSB recipes: each module holds one row of the paper's Table 1 as a ``TrainConfig`` named ``RECIPE``."""
