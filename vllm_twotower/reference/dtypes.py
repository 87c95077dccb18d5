"""Precision policy of the reference: reductions and scans run in at least float32.

bf16/fp16 models compute norms, softmax, the SSM scan and the MoE combine in float32 (as
NVIDIA's code does); float64 models (used by tests that compare cached and recomputed paths
tightly) keep float64 throughout.
"""

from __future__ import annotations

import torch


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)
