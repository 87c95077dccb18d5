"""Offline throughput of the vLLM path in every mode, side by side, and of the reference.

    python benchmarks/throughput.py                 # batch 1 to 64; rewrites docs/performance.md
    python benchmarks/throughput.py --smoke         # a few prompts, batch 1 and 2; prints only (CI)
    python benchmarks/throughput.py --reference-only --device cuda   # the reference on a GPU
    python benchmarks/throughput.py --workload long # long answers, their own checkpoint and table

One ``LLM`` engine on the embedded checkpoint serves the same test-split prompts as
``mask_diffusion``, ``mock_ar``, ``ar``, ``speculative`` and ``auto`` requests (greedy,
per-request ``extra_args``; ``auto`` and ``speculative`` decide block by block with the
engine's learned cost model, ``docs/engine-design.md`` §14).  For a batch size ``B`` the
prompts go in waves of ``B`` (one ``LLM.generate`` call per wave and mode, modes interleaved
wave by wave, so that load from other processes hits
every mode alike); the engine admits up to ``max(batch sizes)`` sequences, so a wave runs as one
continuous batch that drains as its requests finish. Requests stop at EOS (the tasks' answers
are 2 to 13 tokens plus EOS; 48 to 200 with ``--workload long``, which also loads that set's
checkpoint and writes its own section of ``docs/performance.md``) or at ``--max-tokens``; the
table gives the mean output length per mode so that a reader can see that the modes did the
same work.  Reported per mode and batch size:

* output tokens/s, and its ratio to AR's in the same waves (the headline);
* exact match: the share of outputs that solve their task (so speed is read beside quality);
* tokens per denoiser pass (NFE) and passes per block, from the plugin's stats RPC;
* ms per block: wall time per block of one request stream (``wall × B / blocks``);
* speculative: drafted tokens accepted per draft, output tokens per verification step, and how
  many outputs differ from ``ar``'s on the same prompts (must be 0);
* auto: its ratio to the best fixed mode at each batch size; and a plot of output tokens/s
  against batch size, one line per mode (``docs/throughput_<workload>.png``).

The reference implementation (:func:`vllm_twotower.reference.generate`, one request at a time)
runs the same prompts at batch 1, giving the engine-vs-reference ratio.  Timings are wall clock
on whatever machine runs this, which the output names; ratios, not absolute times, are what
transfers between machines.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from docsections import PERFORMANCE, machine_name, replace_section
from workloads import add_workload_arguments, resolve_workload, section

from vllm_twotower.checkpoints import EMBEDDED_ENGINE_ARGS
from vllm_twotower.data import (
    SHORT_WORKLOAD,
    Workload,
    generate_split,
    is_correct,
    load_tokenizer,
)
from vllm_twotower.params import (
    AR,
    AUTO,
    MASK_DIFFUSION,
    MOCK_AR,
    MODES,
    SPECULATIVE,
    resolve_params,
)
from vllm_twotower.reference import SamplingSpec, TwoTowerModel, generate

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Measurement:
    """One mode at one batch size (or the reference): totals over all its waves."""

    label: str
    mode: str
    batch: int
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    nfe: int = 0
    blocks: int = 0  # diffusion blocks, or speculative drafts (one per verification step)
    accepted: int = 0  # speculative: drafted tokens accepted
    #: speculative: requests whose output differs from ar's on the same path and prompts
    differ_from_ar: int = 0
    #: requests whose output solves its task exactly (:data:`Grader`)
    correct: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def exact_match(self) -> str:
        return f"{100 * self.correct / self.requests:.1f} %" if self.requests else "–"

    def cells(self, ar: Measurement | None) -> list[str]:
        ratio = f"{self.tokens_per_s / ar.tokens_per_s:.2f}" if ar and ar.tokens_per_s else "–"
        per_pass = f"{self.tokens / self.nfe:.2f}" if self.nfe else "–"
        per_block = f"{self.nfe / self.blocks:.2f}" if self.blocks else "–"
        block_ms = f"{1e3 * self.seconds * self.batch / self.blocks:.1f}" if self.blocks else "–"
        speculative = self.mode == SPECULATIVE and self.blocks
        # Tokens per verification step: c, the accepted guesses, the AR token after them.
        per_step = f"{self.tokens / self.blocks:.2f}" if speculative else "–"
        accepted = f"{self.accepted / self.blocks:.2f}" if speculative else "–"
        return [
            self.label,
            self.mode,
            str(self.batch),
            str(self.requests),
            f"{self.tokens / max(self.requests, 1):.1f}",
            f"{self.tokens_per_s:.1f}",
            ratio,
            per_pass,
            per_block,
            block_ms,
            accepted,
            per_step,
        ]


HEADER = [
    "path",
    "mode",
    "batch",
    "requests",
    "mean output tokens",
    "output tok/s",
    "× AR",
    "tokens/pass",
    "passes/block",
    "ms/block",
    "accepted/draft",
    "tokens/verification",
]


#: Whether the output ids of prompt ``i`` solve its task (``grader(i, output_ids)``).
Grader = Callable[[int, list[int]], bool]


def test_prompts(
    count: int, checkpoint: Path, workload: Workload = SHORT_WORKLOAD
) -> list[list[int]]:
    """Token ids of ``count`` test-split prompts (all the workload's families, seed 0)."""
    return graded_test_prompts(count, checkpoint, workload)[0]


def graded_test_prompts(
    count: int, checkpoint: Path, workload: Workload = SHORT_WORKLOAD
) -> tuple[list[list[int]], Grader]:
    """:func:`test_prompts` and the :data:`Grader` of their answers: speed is only worth
    comparing between modes at the exact match each reaches."""
    tokenizer = load_tokenizer(checkpoint)
    examples = generate_split("test", count, seed=0, families=workload.families)

    def grade(i: int, output_ids: list[int]) -> bool:
        return is_correct(examples[i], tokenizer.decode(output_ids, skip_special_tokens=False))

    return [tokenizer.encode(e.prompt).ids for e in examples], grade


def measure_reference(
    checkpoint: Path,
    prompts: list[list[int]],
    max_tokens: int,
    device: torch.device,
    grade: Grader | None = None,
) -> list[Measurement]:
    """The reference implementation, one request at a time, in every mode."""
    model = TwoTowerModel.from_pretrained(checkpoint).to(device)
    config = model.config
    results, outputs = [], {}
    for mode in (MASK_DIFFUSION, MOCK_AR, AR, SPECULATIVE):
        # The same resolution an engine request with extra_args={"mode": mode} gets.
        params = resolve_params({"mode": mode}, config.diffusion, config.max_block_size)
        row = Measurement("reference", mode, batch=1)
        generate(model, prompts[:1], params, SamplingSpec(max_new_tokens=max_tokens))  # warm-up
        for i, prompt in enumerate(prompts):
            start = time.perf_counter()
            (out,) = generate(model, [prompt], params, SamplingSpec(max_new_tokens=max_tokens))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row.seconds += time.perf_counter() - start
            row.requests += 1
            row.tokens += len(out.output_ids)
            row.correct += bool(grade and grade(i, out.output_ids))
            outputs.setdefault(mode, []).append(out.output_ids)
            row.nfe += out.nfe
            row.accepted += sum(out.accepted)
            row.blocks += len(out.accepted)  # speculative drafts (none in the other modes)
            if mode == MASK_DIFFUSION:  # whole blocks are denoised, then the output is cut
                row.blocks += -(-len(out.output_ids) // params.block_size)
        results.append(row)
    results[-1].differ_from_ar = sum(
        s != a for s, a in zip(outputs[SPECULATIVE], outputs[AR], strict=True)
    )
    return results


def make_engine(checkpoint: Path, max_num_seqs: int) -> Any:
    """An offline ``LLM`` on ``checkpoint`` with the embedded checkpoint's engine arguments."""
    from vllm import LLM  # imported late: --reference-only needs no vLLM

    return LLM(model=str(checkpoint), max_num_seqs=max_num_seqs, **EMBEDDED_ENGINE_ARGS)


def timed_generate(llm: Any, wave: list[Any], params: Any, row: Measurement) -> list[Any]:
    """Generate one wave and add its wall time, output tokens, passes and blocks to ``row``."""
    from vllm_twotower.engine.offline import timed_generate as timed_call  # needs vLLM

    timed = timed_call(llm, wave, params)
    row.seconds += timed.seconds
    row.requests += len(timed.outputs)
    row.tokens += timed.tokens
    row.nfe += timed.nfe
    row.blocks += timed.blocks
    row.accepted += timed.accepted
    return timed.outputs


def measure_engine(
    checkpoint: Path,
    prompts: list[list[int]],
    batch_sizes: list[int],
    max_tokens: int,
    grade: Grader | None = None,
) -> list[Measurement]:
    """The vLLM path: every mode at every batch size on one engine."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = make_engine(checkpoint, max(batch_sizes))
    # What is alive now (the reference's model and results, the engine's front end) stays alive
    # to the end: out of the collector's reach, so that a full collection cannot land inside a
    # timed wave (one of 0.35 s did, every run, in the same wave: auto's first at batch 64).
    gc.collect()
    gc.freeze()
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    results = []
    for batch in batch_sizes:
        waves = max(2, len(prompts) // batch)
        rows = {m: Measurement("vLLM", m, batch) for m in MODES}
        for w in range(waves):
            indices = [(w * batch + i) % len(inputs) for i in range(batch)]
            wave = [inputs[i] for i in indices]
            outputs = {}
            for mode, row in rows.items():
                params = SamplingParams(
                    max_tokens=max_tokens, temperature=0.0, extra_args={"mode": mode}
                )
                outs = timed_generate(llm, wave, params, row)
                outputs[mode] = [list(o.outputs[0].token_ids) for o in outs]
                if grade is not None:
                    row.correct += sum(map(grade, indices, outputs[mode]))
            rows[SPECULATIVE].differ_from_ar += sum(
                s != a for s, a in zip(outputs[SPECULATIVE], outputs[AR], strict=True)
            )
        results += rows.values()
    return results


def table(rows: list[Measurement]) -> str:
    """Markdown table; each row's ratio is against AR on the same path and batch size."""
    ar_of = {(r.label, r.batch): r for r in rows if r.mode == AR}
    after = HEADER.index("× AR") + 1  # exact match beside the speed ratio
    header = [*HEADER[:after], "exact match", *HEADER[after:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = r.cells(ar_of.get((r.label, r.batch)))
        lines.append("| " + " | ".join([*cells[:after], r.exact_match(), *cells[after:]]) + " |")
    return "\n".join(lines)


def summary(rows: list[Measurement]) -> list[str]:
    """The headline ratios: diffusion vs AR per batch size, engine vs reference at batch 1."""
    lookup = {(r.label, r.mode, r.batch): r for r in rows}
    lines = []
    for r in rows:
        ar = lookup.get((r.label, AR, r.batch))
        if r.mode == MASK_DIFFUSION and ar and ar.tokens_per_s:
            lines.append(
                f"- {r.label}, batch {r.batch}: diffusion / AR = "
                f"{r.tokens_per_s / ar.tokens_per_s:.2f}×"
            )
        if r.mode == SPECULATIVE and ar and ar.tokens_per_s and r.blocks:
            lines.append(
                f"- {r.label}, batch {r.batch}: speculative / AR = "
                f"{r.tokens_per_s / ar.tokens_per_s:.2f}×, {r.tokens / r.blocks:.2f} tokens "
                f"per verification step ({r.accepted / r.blocks:.2f} drafted tokens accepted), "
                f"{r.differ_from_ar} of {r.requests} outputs differ from AR"
            )
    for batch in sorted({r.batch for r in rows if r.label == "vLLM" and r.mode == AUTO}):
        auto = lookup[("vLLM", AUTO, batch)]
        fixed = [lookup[("vLLM", m, batch)] for m in (MASK_DIFFUSION, AR, SPECULATIVE)]
        best = max(fixed, key=lambda r: r.tokens_per_s)
        lines.append(
            f"- vLLM, batch {batch}: auto / best fixed mode ({best.mode}) = "
            f"{auto.tokens_per_s / best.tokens_per_s:.2f}×, auto / AR = "
            f"{auto.tokens_per_s / lookup[('vLLM', AR, batch)].tokens_per_s:.2f}×"
        )
    engine = lookup.get(("vLLM", MASK_DIFFUSION, 1))
    ref = lookup.get(("reference", MASK_DIFFUSION, 1))
    if engine and ref and ref.tokens_per_s:
        lines.append(
            f"- diffusion at batch 1: vLLM path / reference = "
            f"{engine.tokens_per_s / ref.tokens_per_s:.2f}×"
        )
    return lines


def plot(rows: list[Measurement], path: Path, title: str) -> None:
    """Output tokens/s against batch size, one line per mode (the engine's rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in MODES:
        points = sorted(
            (r.batch, r.tokens_per_s) for r in rows if r.label == "vLLM" and r.mode == mode
        )
        style = {"lw": 2.5, "color": "black"} if mode == AUTO else {"lw": 1.2}
        ax.plot(*zip(*points, strict=True), "o-", label=mode, **style)
    ax.set(xscale="log", xlabel="batch size", ylabel="output tokens/s", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_arguments(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--num-prompts", type=int, default=32, help="distinct prompts cycled")
    parser.add_argument("--threads", type=int, default=1, help="reference's torch threads")
    parser.add_argument("--device", default="cpu", help="the reference's device")
    parser.add_argument("--reference-only", action="store_true", help="skip the vLLM engine")
    parser.add_argument("--smoke", action="store_true", help="tiny run, print only (CI)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    workload = resolve_workload(args)
    if args.smoke:
        args.batch_sizes, args.num_prompts, args.max_tokens = [1, 2], 2, 8

    prompts, grade = graded_test_prompts(args.num_prompts, args.checkpoint, workload)
    rows = measure_reference(args.checkpoint, prompts, args.max_tokens, device, grade)
    if not args.reference_only:
        engine_rows = measure_engine(
            args.checkpoint, prompts, args.batch_sizes, args.max_tokens, grade
        )
        rows = engine_rows + rows
    text = "\n".join(
        [
            table(rows),
            "",
            *summary(rows),
            "",
            f"Measured on: {machine_name(device)}, the reference with "
            f"{torch.get_num_threads()} thread(s); `{args.num_prompts}` test prompts"
            + ("" if workload.name == "short" else f" of the {workload.name} workload")
            + ", greedy, "
            f"`max_tokens` {args.max_tokens}, γ from the checkpoint's `generation_config.json`.",
        ]
    )
    print(text)
    if not (args.smoke or args.no_write or args.reference_only):
        replace_section(section("throughput", workload), text)
        figure = PERFORMANCE.parent / f"throughput_{workload.name}.png"
        plot(rows, figure, f"{args.checkpoint.name}: output tokens/s by mode ({workload.name})")
        print(f"wrote {PERFORMANCE} and {figure}")


if __name__ == "__main__":  # vLLM on CPU spawns its engine processes
    main()
