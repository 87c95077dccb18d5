"""The ``--workload`` choice the benchmarks share: which prompts, checkpoint, token budget
and ``docs/performance.md`` section a run uses.

``short`` is the quality suite's task set (answers of 2–13 tokens) on the embedded checkpoint;
``long`` the long-answer set (48–200 tokens) on ``twotower-long`` (``docs/quality.md``).  Each
workload writes its own marked section, so a long run never overwrites the short table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm_twotower.checkpoints import WORKLOAD_CHECKPOINTS
from vllm_twotower.data import WORKLOADS, Workload


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workload`` and the two options whose defaults it decides."""
    parser.add_argument("--workload", choices=list(WORKLOADS), default="short")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="default: the workload's embedded one"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="default: the workload's (32 / 208)"
    )


def resolve_workload(args: argparse.Namespace) -> Workload:
    """The chosen workload, with ``args.checkpoint`` and ``args.max_tokens`` filled in."""
    workload = WORKLOADS[args.workload]
    args.checkpoint = args.checkpoint or WORKLOAD_CHECKPOINTS[workload.name]
    args.max_tokens = args.max_tokens or workload.max_new_tokens
    return workload


def section(name: str, workload: Workload) -> str:
    """The marked section a benchmark writes for ``workload``: ``name`` for the short one,
    ``name-long`` for the long one."""
    return name if workload.name == "short" else f"{name}-{workload.name}"
