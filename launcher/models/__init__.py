"""Models and what trains them: ResNet construction (resnet.py), pretrained weights (pretrained.py),
optimizer + LR schedule (optim.py), losses (losses.py); ``registry.py`` holds the names and ``unwrap_model``.
"""

from launcher.models.pretrained import (
    WeightsUnavailableError,
    load_pretrained_state_dict,
    load_weights_file,
    resolve_weights,
)
from launcher.models.registry import RESNET_NAMES, unwrap_model
from launcher.models.resnet import convert_sync_batchnorm, create_resnet, model_info, set_trainable_layers

__all__ = [
    "RESNET_NAMES",
    "WeightsUnavailableError",
    "convert_sync_batchnorm",
    "create_resnet",
    "load_pretrained_state_dict",
    "load_weights_file",
    "model_info",
    "resolve_weights",
    "set_trainable_layers",
    "unwrap_model",
]
