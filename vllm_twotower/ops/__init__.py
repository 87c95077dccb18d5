"""Compiled ops (``torch.ops.twotower.*``) with their pure-PyTorch fallbacks.

The extension ``vllm_twotower._C`` is optional: when it is missing or stale, every op wrapper in
this package uses its torch fallback, and :func:`extension_available` says why.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)

#: Environment variable that, set to ``1``, forces the torch fallback of every compiled op.
DISABLE_ENV = "TWOTOWER_DISABLE_KERNELS"

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

#: Must equal ``kOpsVersion`` in ``csrc/version.h``; a mismatch means a stale build.
EXPECTED_OPS_VERSION = 4


@functools.cache
def _load() -> str | None:
    """Import the extension once; return ``None`` on success or the reason it is unusable."""
    try:
        import vllm_twotower._C  # noqa: F401
    except ImportError as exc:
        return f"the compiled extension is not built ({exc})"
    built = int(torch.ops.twotower.version())
    if built != EXPECTED_OPS_VERSION:
        return (
            f"the compiled extension is stale (ops version {built}, "
            f"expected {EXPECTED_OPS_VERSION})"
        )
    return None


def extension_available() -> bool:
    """Whether ``torch.ops.twotower`` kernels can be used in this process."""
    reason = _load()
    if reason is not None:
        logger.info("vllm-twotower: using pure-PyTorch ops: %s", reason)
    return reason is None


def extension_status() -> str:
    """A one-line human-readable status of the compiled extension."""
    reason = _load()
    return "compiled ops loaded" if reason is None else reason


def kernels_disabled() -> bool:
    """Whether :data:`DISABLE_ENV` forces the torch fallbacks."""
    return os.environ.get(DISABLE_ENV, "0") == "1"


def has_kernel(op_name: str, device: torch.device) -> bool:
    """Whether the loaded extension implements ``twotower::<op_name>`` on ``device``.

    CUDA kernels exist only in builds against a CUDA torch, so a CPU-only build must not be asked
    to run a CUDA tensor through the op.
    """
    key = _DISPATCH_KEYS.get(device.type)
    return (
        key is not None
        and not kernels_disabled()
        and extension_available()
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"twotower::{op_name}", key)
    )
