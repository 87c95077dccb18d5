"""TP=2 over two Ray nodes vs TP=2 over ``mp`` vs one process, every mode, side by side.

    python benchmarks/multinode.py             # rewrites the table in docs/multinode.md
    python benchmarks/multinode.py --smoke     # 2 prompts, 8 tokens; prints only

One run builds three engines on the embedded checkpoint, one after the other (each takes the
whole machine), and serves each the same test-split prompts in waves of ``--batch`` as
``mask_diffusion``, ``mock_ar`` and ``ar`` requests (greedy; modes interleaved wave by wave):

* ``one process`` — ``LLM(...)``: vLLM's default executor, one worker;
* ``TP=2 mp`` — ``tensor_parallel_size=2``: two workers on this host, shared-memory all-reduce;
* ``TP=2 Ray`` — ``distributed_executor_backend="ray"`` over the two-node loopback cluster of
  :mod:`vllm_twotower.multinode.loopback`: one worker per Ray node, gloo all-reduce over TCP,
  the second worker's inputs and outputs over vLLM's TCP message queue.

Each engine first serves one untimed wave per mode (a Ray engine's first ``generate`` took
~11 s more than the next one here).  Reported: engine start-up time (the ``LLM`` constructor;
the cluster's own start separately),
output tokens/s per mode, and the ratios TP=2 Ray / TP=2 mp and TP=2 Ray / one process, from
this one run.  Both nodes are on this host, so the Ray column measures the Ray executor and the
cross-node transports on loopback, not a network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from docsections import machine_name, replace_section
from throughput import Measurement, test_prompts, timed_generate

from vllm_twotower.checkpoints import DEFAULT_CHECKPOINT, EMBEDDED_ENGINE_ARGS
from vllm_twotower.multinode.loopback import serving_cluster
from vllm_twotower.params import MODES

MULTINODE = Path(__file__).resolve().parent.parent / "docs" / "multinode.md"
ONE, MP, RAY = "one process", "TP=2 mp", "TP=2 Ray (2 nodes)"


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set variables for the engines built inside (vLLM's engine processes inherit them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def measure(label: str, engine_kwargs: dict, prompts: list, args: argparse.Namespace) -> tuple:
    """Build one engine (timed), serve every wave in every mode, shut it down."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=str(args.checkpoint), max_num_seqs=args.batch, **EMBEDDED_ENGINE_ARGS,
              **engine_kwargs)  # fmt: skip
    startup = time.perf_counter() - start
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    rows = {mode: Measurement(label, mode, args.batch) for mode in MODES}
    try:
        for mode in MODES:  # warm-up, untimed: a Ray engine's first steps take seconds more
            warm = SamplingParams(max_tokens=args.max_tokens, extra_args={"mode": mode})
            llm.generate(inputs[: args.batch], warm, use_tqdm=False)
        for w in range(max(1, len(inputs) // args.batch)):
            wave = inputs[w * args.batch : (w + 1) * args.batch]
            for mode, row in rows.items():
                params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                        extra_args={"mode": mode})  # fmt: skip
                timed_generate(llm, wave, params, row)
    finally:
        llm.llm_engine.engine_core.shutdown()
    return startup, list(rows.values())


def table(startups: dict[str, float], rows: list[Measurement], cluster_s: float) -> str:
    by = {(r.label, r.mode): r for r in rows}
    lines = [
        "| path | engine start-up (s) | mode | output tok/s | Ray / mp | Ray / one process |",
        "|---|---|---|---|---|---|",
    ]
    for label in (ONE, MP, RAY):
        for mode in MODES:
            row, ray = by[(label, mode)], by[(RAY, mode)]
            ratios = ["–", "–"]
            if label == RAY:
                ratios = [f"{ray.tokens_per_s / by[(other, mode)].tokens_per_s:.2f}"
                          for other in (MP, ONE)]  # fmt: skip
            lines.append(f"| {label} | {startups[label]:.1f} | {mode} | "
                         f"{row.tokens_per_s:.1f} | {ratios[0]} | {ratios[1]} |")  # fmt: skip
    lines += ["", f"Two-node Ray cluster start (both `ray start`): {cluster_s:.1f} s."]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    # (full run, --smoke): test prompts, wave size, output tokens per request
    sizes = {"--num-prompts": (32, 2), "--batch": (8, 2), "--max-tokens": (32, 8)}
    for flag, (default, _) in sizes.items():
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--smoke", action="store_true", help="tiny run, print only")
    parser.add_argument("--no-write", action="store_true", help="do not update the doc")
    args = parser.parse_args()
    if args.smoke:
        for flag, (_, smoke) in sizes.items():
            setattr(args, flag.removeprefix("--").replace("-", "_"), smoke)
    return args


def main() -> None:
    args = parse_args()

    prompts = test_prompts(args.num_prompts, args.checkpoint)
    cores = sorted(os.sched_getaffinity(0))
    startups, rows = {}, []
    load = [os.getloadavg()[0]]  # other work on the machine skews every row; say how much
    with environment({"VLLM_CPU_OMP_THREADS_BIND": "auto"}):
        startups[ONE], got = measure(ONE, {}, prompts, args)
    rows += got
    with environment({"VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[-1]}"}):
        startups[MP], got = measure(MP, {"tensor_parallel_size": 2}, prompts, args)
    rows += got
    temp_dir = Path(tempfile.mkdtemp(prefix="ttray-", dir="/tmp"))
    try:
        cluster = serving_cluster(temp_dir)
        start = time.perf_counter()
        with cluster:
            cluster_s = time.perf_counter() - start
            ray_kwargs = {"tensor_parallel_size": 2, "distributed_executor_backend": "ray"}
            with environment(cluster.driver_env()):
                startups[RAY], got = measure(RAY, ray_kwargs, prompts, args)
            rows += got
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)

    load.append(os.getloadavg()[0])
    text = "\n".join([
        table(startups, rows, cluster_s),
        "",
        f"Measured on: {machine_name()}; {args.num_prompts} test prompts in waves of "
        f"{args.batch}, greedy, `max_tokens` {args.max_tokens}; both Ray nodes on this host; "
        f"1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end.",
    ])  # fmt: skip
    print(text)
    if not (args.smoke or args.no_write):
        replace_section("multinode", text, MULTINODE)
        print(f"wrote {MULTINODE}")


if __name__ == "__main__":  # vLLM on CPU spawns its engine processes
    main()
