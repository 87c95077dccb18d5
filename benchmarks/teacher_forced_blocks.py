"""Is the long set's diffusion gap in each block, or does it come from drift?

Each test answer is cut into the blocks ``mask_diffusion`` denoises (16 tokens from the
answer's start); every block is denoised once with the *true* answer before it as context
(teacher forcing, the reference, greedy, the server's default γ), and scored: the whole block
right or not.  If free-running exact match were far below what these per-block rates compound
to, early mistakes would be derailing later blocks; if it matches, the gap is the denoiser's
accuracy inside a block.

    .venv/bin/python benchmarks/teacher_forced_blocks.py           # writes docs/quality.md
    .venv/bin/python benchmarks/teacher_forced_blocks.py --smoke   # one prompt per family, prints
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from docsections import QUALITY, replace_section, table_text

from vllm_twotower.checkpoints import WORKLOAD_CHECKPOINTS
from vllm_twotower.data import WORKLOADS, generate_split, load_tokenizer
from vllm_twotower.params import MASK_DIFFUSION, resolve_params
from vllm_twotower.reference import SamplingSpec, TwoTowerModel
from vllm_twotower.reference.generate import denoise_block


def measure(n_per_family: int) -> list[str]:
    """Table rows per family: teacher-forced block exact match, passes per block, blocks."""
    workload = WORKLOADS["long"]
    checkpoint = WORKLOAD_CHECKPOINTS[workload.name]
    model, tokenizer = TwoTowerModel.from_pretrained(checkpoint), load_tokenizer(checkpoint)
    config = model.config
    params = resolve_params({"mode": MASK_DIFFUSION}, config.diffusion, config.max_block_size)
    size, eos = params.block_size, config.eos_token_id
    hits: dict[str, list[bool]] = defaultdict(list)
    passes: dict[str, list[int]] = defaultdict(list)
    examples = generate_split(
        "test", n_per_family * len(workload.families), 0, families=workload.families
    )
    for example in examples:
        prompt = torch.tensor(tokenizer.encode(example.prompt).ids)
        answer = [*tokenizer.encode(example.answer, add_special_tokens=False).ids, eos]
        _, state = model.extend_context(prompt, model.empty_context())
        for start in range(0, len(answer), size):
            target = answer[start : start + size]
            block, per_pass, _ = denoise_block(
                model, state, params, SamplingSpec(max_new_tokens=size), prompt, answer[:start]
            )
            hits[example.family].append(block.tolist()[: len(target)] == target)
            passes[example.family].append(len(per_pass))
            _, state = model.extend_context(torch.tensor(target), state)
    hits["all"] = [x for f in workload.families for x in hits[f]]
    passes["all"] = [x for f in workload.families for x in passes[f]]
    rows = []
    for family in (*workload.families, "all"):
        h, p = hits[family], passes[family]
        answers = n_per_family * (len(workload.families) if family == "all" else 1)
        rate, blocks_per_answer = sum(h) / len(h), len(h) / answers
        rows.append(
            f"| {family} | {100 * rate:.1f} % | {100 * rate**blocks_per_answer:.1f} % "
            f"| {blocks_per_answer:.1f} | {sum(p) / len(p):.2f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-per-family", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="1 prompt per family, prints only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = measure(1 if args.smoke else args.n_per_family)
    if args.smoke:
        return
    caption = (
        "`.venv/bin/python benchmarks/teacher_forced_blocks.py` (reference, long test split, "
        f"{args.n_per_family} prompts per family, greedy, the server's default γ)."
    )
    header = [
        "family",
        "block exact match, true context",
        "compounded over an answer's blocks",
        "blocks per answer",
        "passes per block",
    ]
    text = table_text(caption, header, rows)
    replace_section("teacher-forced-blocks", text, QUALITY)
    print(f"wrote {QUALITY}")


if __name__ == "__main__":
    main()
