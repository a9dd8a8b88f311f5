"""`shardify`: class folders -> WebDataset tar shards (+ ``_info.json``, ``classes.json``, ``report.json``).

    walk + split plan (launcher.data.folders) -> encode.py (process pool, ordered blocks)
    -> writer.py (tars under temporary names, published atomically, _info.json last) -> verify.py

Python API::

    from launcher.shardify import shardify, verify
    result = shardify("imgs", "shards/imgs", val_fraction=0.1, workers=4)
    check = verify("shards/imgs")
"""

from launcher.shardify.pipeline import (
    EXIT_CODES_HELP,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SKIPPED,
    EXIT_STRICT,
    EXIT_USAGE,
    EXIT_VERIFY_FAILED,
    ShardifyError,
    ShardifyOptions,
    ShardifyResult,
    SkippedFile,
    default_out,
    shardify,
)
from launcher.shardify.verify import VerifyResult, verify

__all__ = [
    "EXIT_CODES_HELP", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_SKIPPED", "EXIT_STRICT", "EXIT_USAGE",
    "EXIT_VERIFY_FAILED", "ShardifyError", "ShardifyOptions", "ShardifyResult", "SkippedFile", "VerifyResult",
    "default_out", "shardify", "verify",
]
