"""Decode cost against context length: AR per 16 tokens vs diffusion per block, side by side.

    python benchmarks/context_scaling.py              # 64 / 1k / 4k / 16k × batch 1, 8
    python benchmarks/context_scaling.py --contexts 64 1024 4096 16384 32768
    python benchmarks/context_scaling.py --smoke      # tiny, prints only (CI)

One ``LLM`` engine on the embedded checkpoint (``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1``: the model has
no position embeddings).  For every context length and batch size, rows of random letters are
decoded in three modes, interleaved run by run so that load from other processes hits them
alike: ``ar``, ``mask_diffusion`` at ``steps_per_block: 1`` (one denoiser pass per block,
diffusion's best case: this measures cost, not the model's confidence) and ``mask_diffusion`` at
the checkpoint's default γ.  Decode time of ``long - short`` tokens is ``t(long) - t(short)``
(``ignore_eos``; every call has fresh prompts, so prefill happens in both and cancels), median
of ``--repeats``; it is reported per 16 tokens (one block).

Peak memory is the engine process's peak RSS (``VmHWM``, reset through ``/proc/PID/clear_refs``
before each configuration) next to its RSS when idle after start-up, which holds the weights
and the whole KV cache (``VLLM_CPU_KVCACHE_SPACE``) already.

A model of KV bytes read per committed token (``b`` = context K/V bytes per token over all
attention layers, ``L`` = context length, ``P`` = denoiser passes per block of 16): AR reads
``L·b`` per token; diffusion reads ``L·b`` per pass plus ``L·b`` once for the context tower's
extension by the committed block, ``(P + 1)·L·b / 16`` per token.  At long contexts, where
those reads dominate, diffusion / AR speed approaches ``16 / (P + 1)``: 8× at one pass per
block.  The table prints that bound next to the measured ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from docsections import PERFORMANCE, machine_name, replace_section

from vllm_twotower.checkpoints import DEFAULT_CHECKPOINT, EMBEDDED_ENGINE_ARGS
from vllm_twotower.data import load_tokenizer
from vllm_twotower.params import AR, MASK_DIFFUSION

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 16
KV_SPACE_GIB = 2
MODES = {
    "ar": {"mode": AR},
    "diffusion, 1 pass/block": {"mode": MASK_DIFFUSION, "steps_per_block": 1},
    "diffusion, default γ": {"mode": MASK_DIFFUSION},
}


@dataclass
class Cell:
    """One (context, batch): decode seconds per mode and run, passes per block, peak RSS."""

    context: int
    batch: int
    seconds: dict[str, list[float]] = field(default_factory=dict)
    passes_per_block: float = 0.0
    peak_rss: int = 0
    after_rss: int = 0  # after the runs: KV cache pages written stay resident

    def per_block_ms(self, mode: str, tokens: int) -> float:
        return 1e3 * statistics.median(self.seconds[mode]) * BLOCK / tokens


def engine_processes() -> list[psutil.Process]:
    """The processes that hold the model and its caches: vLLM's workers (its engine core when
    it runs the model itself)."""
    children = psutil.Process().children(recursive=True)
    for name in ("Worker", "EngineCore"):
        found = [p for p in children if name in " ".join([*p.cmdline(), p.name()])]
        if found:
            return found
    return children


def reset_peak(procs: list[psutil.Process]) -> None:
    for proc in procs:
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")


def rss(procs: list[psutil.Process], field: str = "VmHWM") -> int:
    """Sum over ``procs`` of the peak (``VmHWM``, since the last :func:`reset_peak`) or current
    (``VmRSS``) resident set, bytes."""
    total = 0
    for proc in procs:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                total += int(line.split()[1]) * 1024
    return total


def random_prompts(letters: list[int], count: int, length: int, seed: int) -> list[Any]:
    from vllm.inputs import TokensPrompt

    rng = random.Random(seed)
    return [
        TokensPrompt(prompt_token_ids=[rng.choice(letters) for _ in range(length)])
        for _ in range(count)
    ]


def measure(
    contexts: list[int], batches: list[int], short: int, long: int, repeats: int
) -> tuple[list[Cell], int]:
    """Every configuration on one engine; also returns the engine's idle RSS."""
    from vllm import LLM, SamplingParams

    from vllm_twotower.engine.offline import timed_generate

    alphabet = load_tokenizer(DEFAULT_CHECKPOINT).encode("abcdefghijklmnopqrstuvwxyz").ids
    letters = sorted(set(alphabet) - {1})  # without BOS
    # Prefix caching off: every prompt is fresh, and what is timed is decoding, not lookups.
    args = dict(
        EMBEDDED_ENGINE_ARGS,
        max_model_len=max(contexts) + long + BLOCK,
        enable_prefix_caching=False,
    )
    llm = LLM(model=str(DEFAULT_CHECKPOINT), max_num_seqs=max(batches), **args)
    procs = engine_processes()
    seed = 0

    def params(extra: dict, tokens: int) -> Any:
        return SamplingParams(
            max_tokens=tokens, temperature=0.0, ignore_eos=True, extra_args=dict(extra)
        )

    # Warm-up: every mode once.
    for extra in MODES.values():
        llm.generate(random_prompts(letters, 1, 32, seed), params(extra, BLOCK), use_tqdm=False)
    idle = rss(procs, "VmRSS")
    cells = []
    for context in contexts:
        for batch in batches:
            cell = Cell(context, batch, {mode: [] for mode in MODES})
            reset_peak(procs)
            passes = blocks = 0
            for _ in range(repeats):
                for mode, extra in MODES.items():
                    wall = {}
                    for tokens in (short, long):
                        seed += 1
                        wave = random_prompts(letters, batch, context, seed)
                        timed = timed_generate(llm, wave, params(extra, tokens))
                        wall[tokens] = timed.seconds
                        if mode == "diffusion, default γ":
                            passes += timed.nfe
                            blocks += timed.blocks
                    cell.seconds[mode].append(wall[long] - wall[short])
            cell.passes_per_block = passes / max(blocks, 1)
            cell.peak_rss = rss(procs)
            cell.after_rss = rss(procs, "VmRSS")
            cells.append(cell)
            print(render_row(cell, long - short), flush=True)
    return cells, idle


HEADER = (
    "| context | batch | AR ms/16 tok | diffusion 1 pass/block, ms/block | × AR | KV model × AR "
    "| diffusion default γ, ms/block | passes/block | × AR | KV model × AR | worker peak RSS "
    "| transient |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def render_row(cell: Cell, tokens: int) -> str:
    ar = cell.per_block_ms("ar", tokens)
    one = cell.per_block_ms("diffusion, 1 pass/block", tokens)
    default = cell.per_block_ms("diffusion, default γ", tokens)
    return (
        f"| {cell.context:,} | {cell.batch} | {ar:.1f} | {one:.1f} | {ar / one:.2f}× | "
        f"{BLOCK / 2:.1f}× | {default:.1f} | {cell.passes_per_block:.2f} | {ar / default:.2f}× | "
        f"{BLOCK / (cell.passes_per_block + 1):.1f}× | {cell.peak_rss / 2**20:,.0f} MiB | "
        f"{(cell.peak_rss - cell.after_rss) / 2**20:,.0f} MiB |"
    )


def kv_bytes_per_token() -> int:
    """Context K/V bytes per token over all attention layers of the embedded checkpoint."""
    config = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())
    layers = config["hybrid_override_pattern"].count("*")
    return layers * 2 * config["num_key_value_heads"] * config["head_dim"] * 4  # float32


def plot(cells: list[Cell], tokens: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({c.batch for c in cells}):
        rows = [c for c in cells if c.batch == batch]
        x = [c.context for c in rows]
        for mode, style in (("ar", "-"), ("diffusion, 1 pass/block", "--")):
            ax.plot(
                x,
                [c.per_block_ms(mode, tokens) for c in rows],
                style,
                marker="o",
                label=f"{mode}, batch {batch}",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("ms per 16 tokens (per block)")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 1024, 4096, 16384])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--short", type=int, default=64, help="tokens of the short run")
    parser.add_argument("--long", type=int, default=192, help="tokens of the long run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny run, print only (CI)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    args = parser.parse_args()
    if args.smoke:
        args.contexts, args.batch_sizes, args.short, args.long, args.repeats = (
            [64, 200],
            [1, 2],
            16,
            32,
            1,
        )
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_SPACE_GIB))
    tokens = args.long - args.short
    print(HEADER)
    cells, idle = measure(args.contexts, args.batch_sizes, args.short, args.long, args.repeats)
    weights = (DEFAULT_CHECKPOINT / "model.safetensors").stat().st_size
    kv_space = float(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * 2**30
    worst = max(cells, key=lambda c: (c.context, c.batch))
    text = "\n".join(
        [
            HEADER,
            *(render_row(c, tokens) for c in cells),
            "",
            f"Model worker RSS idle after start-up: {idle / 2**20:,.0f} MiB (runtime, weights "
            f"{weights / 2**20:.0f} MiB, the {kv_space / 2**20:,.0f} MiB KV cache as far as its "
            f"pages are resident).  During the "
            f"{worst.context:,}-token batch-{worst.batch} runs: peak {worst.peak_rss / 2**20:,.0f}"
            f" MiB, {worst.after_rss / 2**20:,.0f} MiB resident after them; the transient "
            f"(peak − after, what the passes allocate and free) is "
            f"{(worst.peak_rss - worst.after_rss) / 2**20:,.0f} MiB = "
            f"{(worst.peak_rss - worst.after_rss) / (weights + kv_space):.1%} of weights + KV "
            "cache.",
            f"KV bytes per context token (all attention layers): {kv_bytes_per_token():,}.",
            "",
            f"Measured on: {machine_name('cpu')}, shared with other jobs (ratios are measured "
            f"side by side, run by run; absolute times are noisy); decode time of {tokens} tokens "
            f"per row as t({args.long}) − t({args.short}), median of {args.repeats}.",
        ]
    )
    print(text)
    if not (args.smoke or args.no_write):
        plot(cells, tokens, ROOT / "docs" / "context_scaling.png")
        replace_section("context_scaling", text)
        print(f"wrote {PERFORMANCE}")


if __name__ == "__main__":  # vLLM on CPU spawns its engine processes
    main()
