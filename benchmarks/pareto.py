"""γ sweep through the vLLM path: accuracy against measured throughput, one engine, one run.

    python benchmarks/pareto.py              # rewrites docs/performance.md and docs/pareto.png
    python benchmarks/pareto.py --no-write   # the same, prints only
    python benchmarks/pareto.py --smoke      # a few prompts, two γ; prints only, plot to tmp (CI)
    python benchmarks/pareto.py --workload long --n-per-family 16   # long answers, own section

One ``LLM`` engine on the embedded checkpoint (``benchmarks/throughput.py``'s ``make_engine``:
``EMBEDDED_ENGINE_ARGS``, float32, the dtype in which the engine is token-exact with the
reference) serves the quality suite's test-split prompts
(``generate_split("test", n, seed=0)``, as ``benchmarks/quality.py``) once per configuration:
``ar`` and ``mask_diffusion`` at each γ of ``quality.THRESHOLDS``, chosen per request with
``extra_args``.  The prompts go in waves of ``--batch-size``, one ``LLM.generate`` call per wave
and configuration, configurations interleaved wave by wave so that load from other processes
hits every γ alike.

Both axes come from the same outputs: the accuracy is exact match per family
(:func:`vllm_twotower.data.accuracy_by_family`) of the very generations that were timed — greedy
engine outputs equal the reference's token for token, so with ``--n-per-family 100`` they
reproduce ``docs/quality.md`` — and the throughput is output tokens/s with its ratio to AR in the
same waves, plus tokens per denoiser pass and passes per block from the plugin's stats RPC.
The plot puts mean accuracy against the throughput ratio to AR, one point per γ.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docsections import machine_name, replace_section
from quality import RETENTION_TARGET, THRESHOLDS
from throughput import HEADER, Measurement, make_engine, test_prompts, timed_generate
from workloads import add_workload_arguments, resolve_workload, section

from vllm_twotower.data import Workload, accuracy_by_family, generate_split, load_tokenizer
from vllm_twotower.params import AR, MASK_DIFFUSION

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Point:
    """One configuration: its per-request ``extra_args``, timing totals and generations."""

    extra_args: dict[str, Any]
    measurement: Measurement
    texts: list[str] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.measurement.label


def configurations(thresholds: list[float], batch: int) -> list[Point]:
    """AR first (the reference point of every ratio), then diffusion at each γ."""
    points = [Point({"mode": AR}, Measurement("ar", AR, batch))]
    for g in thresholds:
        extra = {"mode": MASK_DIFFUSION, "confidence_threshold": g}
        points.append(Point(extra, Measurement(f"γ = {g:g}", MASK_DIFFUSION, batch)))
    return points


def sweep(checkpoint: Path, points: list[Point], prompts: list[list[int]], max_tokens: int) -> None:
    """Serve every prompt once per configuration on one engine, waves interleaved."""
    from vllm import SamplingParams  # imported late: --help needs no vLLM
    from vllm.inputs import TokensPrompt

    batch = points[0].measurement.batch
    llm = make_engine(checkpoint, batch)
    tokenizer = load_tokenizer(checkpoint)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    for start in range(0, len(inputs), batch):
        wave = inputs[start : start + batch]
        for point in points:
            params = SamplingParams(
                max_tokens=max_tokens, temperature=0.0, extra_args=point.extra_args
            )
            for output in timed_generate(llm, wave, params, point.measurement):
                ids = output.outputs[0].token_ids
                point.texts.append(tokenizer.decode(ids, skip_special_tokens=False))


def table(points: list[Point], families: tuple[str, ...]) -> str:
    """Throughput columns as ``benchmarks/throughput.py`` prints them, then accuracy."""
    ar = points[0]
    head = ["configuration", *HEADER[1:], "accuracy %", "% of AR accuracy", *families]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        mean = p.accuracy["all"]
        cells = [*p.measurement.cells(ar.measurement), f"**{100 * mean:.1f}**"]
        cells.append(f"{100 * mean / ar.accuracy['all']:.1f}" if ar.accuracy["all"] else "–")
        cells += [f"{100 * p.accuracy.get(f, 0.0):.0f}" for f in families]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(points: list[Point], path: Path, title: str) -> None:
    """Mean accuracy against output tokens/s relative to AR, one labelled point per γ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ar = points[0]
    speed = {p.label: p.measurement.tokens_per_s / ar.measurement.tokens_per_s for p in points}
    diffusion = points[1:]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = [speed[p.label] for p in diffusion], [100 * p.accuracy["all"] for p in diffusion]
    ax.plot(xs, ys, "o-", label=f"mask diffusion (batch {ar.measurement.batch})")
    for p, x, y in zip(diffusion, xs, ys, strict=True):
        ax.annotate(p.label, (x, y), fontsize=8, textcoords="offset points", xytext=(4, 4))
    ax.plot([1.0], [100 * ar.accuracy["all"]], "k*", markersize=12, label="AR")
    target = 100 * ar.accuracy["all"] * RETENTION_TARGET
    ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"{100 * RETENTION_TARGET:g} % of AR")
    ax.set(
        xlabel="output tokens/s relative to AR (same engine, same waves)",
        ylabel="exact-match accuracy, all test prompts (%)",
        title=title,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_arguments(parser)
    parser.add_argument("--n-per-family", type=int, default=100)
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="tiny run, print only (CI)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    args = parser.parse_args()
    workload = resolve_workload(args)
    if args.smoke:
        args.n_per_family, args.thresholds, args.batch_size = 1, [0.5, 0.9], 4
    count = args.n_per_family * len(workload.families)
    examples = generate_split("test", count, seed=0, families=workload.families)
    points = configurations(args.thresholds, args.batch_size)
    prompts = test_prompts(count, args.checkpoint, workload)
    sweep(args.checkpoint, points, prompts, args.max_tokens)
    for p in points:
        p.accuracy = accuracy_by_family(examples, p.texts)

    write = not (args.smoke or args.no_write)
    out_dir = ROOT / "docs" if write else Path(tempfile.mkdtemp(prefix="twotower-pareto-"))
    name = section("pareto", workload)
    title = f"{args.checkpoint.name} through vLLM: accuracy vs throughput over γ"
    plot(points, out_dir / f"{name}.png", title)
    text = "\n".join(
        [
            table(points, workload.families),
            "",
            f"Measured on: {machine_name()}; "
            f"one `LLM` engine (float32), {count} test-split prompts ({args.n_per_family} "
            f"per family, seed 0), greedy, `max_tokens` {args.max_tokens}, waves of "
            f"{args.batch_size}, S = T = 16 from `generation_config.json`.  Command: "
            f"`.venv/bin/python benchmarks/pareto.py{_workload_flag(workload)} "
            f"--n-per-family {args.n_per_family} --batch-size {args.batch_size}`.",
            "",
            f"![accuracy against throughput over γ]({name}.png)",
        ]
    )
    print(text)
    print(f"plot: {out_dir / f'{name}.png'}")
    if write:
        replace_section(name, text)
        print("wrote docs/performance.md")


def _workload_flag(workload: Workload) -> str:
    return "" if workload.name == "short" else f" --workload {workload.name}"


if __name__ == "__main__":  # vLLM on CPU spawns its engine processes
    main()
