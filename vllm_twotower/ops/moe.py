"""MoE layer op: the compiled kernel where built, else the reference torch implementation."""

from __future__ import annotations

from vllm_twotower.reference.moe import moe_forward

__all__ = ["moe_forward"]
