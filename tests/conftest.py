"""Fixtures shared by the test modules (pytest finds them here; nothing imports this file)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real digit scans (scikit-learn) as shardify shards, 15% validation; read-only for the tests."""
    from launcher.data.sample_data import make_digits_tree
    from launcher.shardify import shardify

    root = tmp_path_factory.mktemp("digits")
    make_digits_tree(root / "images", size=32)
    shardify(root / "images", root / "shards", val_fraction=0.15, workers=1, progress=False)
    return root / "shards"
