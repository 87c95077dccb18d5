"""Where may a diffusion block start?  Exact match when ``k`` AR tokens precede the blocks.

The denoiser is trained on blocks cut from the answer's start (:mod:`vllm_twotower.train`), so
``mask_diffusion``'s blocks always begin a whole number of blocks after the prompt.  ``auto``
(issue #24) interleaves AR tokens and blocks; this measures, with the reference, what a block
started ``k`` tokens off that grid costs: each test prompt is generated with the schedule
``a × k`` then blocks (``k = 0`` is ``mask_diffusion``; ``k = 16`` is one block of AR tokens,
back on the grid), on both embedded checkpoints, at the server's default γ.  The result decided
the engine's policy: ``auto`` switches to AR at any step but back to blocks only on the grid.

    .venv/bin/python benchmarks/block_alignment.py            # writes docs/quality.md
    .venv/bin/python benchmarks/block_alignment.py --smoke    # one prompt per family, prints
"""

from __future__ import annotations

import argparse
import time

import torch
from docsections import QUALITY, replace_section, table_text

from vllm_twotower.checkpoints import WORKLOAD_CHECKPOINTS
from vllm_twotower.data import WORKLOADS, generate_split, is_correct, load_tokenizer
from vllm_twotower.params import AUTO, resolve_params
from vllm_twotower.reference import SamplingSpec, TwoTowerModel, generate

OFFSETS = (0, 1, 3, 8, 13, 16)


def _off_grid_allowed() -> None:
    """The reference refuses a block off the grid (that is the engine's contract); this
    benchmark measures what that refusal protects, so it lifts it for its own process."""
    import importlib

    importlib.import_module("vllm_twotower.reference.generate")._check_on_grid = lambda *_: None


def measure(workload: str, n_per_family: int, offsets: list[int]) -> list[str]:
    """Table rows: exact match and passes per block for each offset."""
    spec = WORKLOADS[workload]
    checkpoint = WORKLOAD_CHECKPOINTS[spec.name]
    model, tokenizer = TwoTowerModel.from_pretrained(checkpoint), load_tokenizer(checkpoint)
    examples = generate_split("test", n_per_family * len(spec.families), 0, families=spec.families)
    prompts = [tokenizer.encode(e.prompt).ids for e in examples]
    config = model.config
    params = resolve_params({"mode": AUTO}, config.diffusion, config.max_block_size)
    sampling = SamplingSpec(max_new_tokens=spec.max_new_tokens)
    rows = []
    for k in offsets:
        started = time.perf_counter()
        schedule = "a" * k + "d" * spec.max_new_tokens
        results = generate(model, prompts, params, sampling, [schedule] * len(prompts))
        hits = [
            is_correct(e, tokenizer.decode(r.output_ids, skip_special_tokens=False))
            for e, r in zip(examples, results, strict=True)
        ]
        block_tokens = [max(0, len(r.output_ids) - k) for r in results]
        blocks = sum(-(-n // params.block_size) for n in block_tokens)
        passes = sum(r.nfe for r in results)
        row = (
            f"| {workload} | {k} | {'yes' if k % params.block_size == 0 else 'no'} "
            f"| {100 * sum(hits) / len(hits):.1f} % "
            f"| {passes / blocks:.2f} | {sum(block_tokens) / passes:.2f} |"
            if passes
            else f"| {workload} | {k} | – | {100 * sum(hits) / len(hits):.1f} % | – | – |"
        )
        print(row, f"({time.perf_counter() - started:.0f} s)", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-per-family", type=int, default=16)
    parser.add_argument("--offsets", type=int, nargs="+", default=list(OFFSETS))
    parser.add_argument(
        "--workloads", nargs="+", choices=list(WORKLOADS), default=["short", "long"]
    )
    parser.add_argument("--smoke", action="store_true", help="1 prompt per family, prints only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _off_grid_allowed()
    if args.smoke:
        args.n_per_family, args.offsets, args.workloads = 1, [0, 3], ["short"]
    rows = [row for w in args.workloads for row in measure(w, args.n_per_family, args.offsets)]
    if args.smoke:
        return
    caption = (
        f"`.venv/bin/python benchmarks/block_alignment.py` (reference, test split, "
        f"{args.n_per_family} prompts per family, greedy, the server's default γ; schedule "
        "`a × k` then blocks)."
    )
    header = [
        "workload",
        "AR tokens before the blocks (k)",
        "blocks on the grid",
        "exact match",
        "passes/block",
        "block tokens/pass",
    ]
    text = table_text(caption, header, rows)
    replace_section("block-alignment", text, QUALITY)
    print(f"wrote {QUALITY}")


if __name__ == "__main__":
    main()
