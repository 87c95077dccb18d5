"""Quality suite: exact-match accuracy per task family, AR vs. mask diffusion, tokens per pass.

    python benchmarks/quality.py [--checkpoint DIR] [--n-per-family 100] [--smoke]
    python benchmarks/quality.py --workload long    # the long-answer set, its own checkpoint

Every answer is produced by the project's generation path (:func:`vllm_twotower.reference.generate`,
greedy, the commit rule of :mod:`vllm_twotower.commit`) on the *test* split of the task corpus,
whose prompts never occur in training.  Modes: ``ar`` (context tower + ``context_lm_head``) and
``mask_diffusion`` at each confidence threshold γ (S = 16, T = 16).  For diffusion it reports

* **tokens / pass** — tokens committed per denoiser forward pass (NFE), over whole blocks: what
  the engine commits, EOS padding after the answer included;
* **answer tokens / pass** — only the tokens that are returned (up to and including EOS) per
  pass, the stricter measure.

Results go between markers in ``docs/quality.md`` (the hand-written parts are kept) and the plot
of mean accuracy against tokens per pass to ``docs/quality.png``.  ``--workload long`` evaluates
the long-answer families (48–200 tokens, :mod:`vllm_twotower.data.long_tasks`) on their own
checkpoint with a budget that holds every answer, adds *passes / block* (answers span many
blocks there), and writes beside the short results — its own markers in the same page and
``docs/quality-long.png`` — never over them.  ``--smoke`` runs one example
per family at γ = 0.8 only and writes into a temporary directory unless ``--out-dir`` is given
(for CI).  Targets (issue 4): AR ≥ 90 % mean accuracy; diffusion at γ = 0.8 keeps ≥ 98.7 % of it
with ≥ 3 tokens per pass.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_twotower.checkpoints import WORKLOAD_CHECKPOINTS
from vllm_twotower.data import (
    LONG_WORKLOAD,
    WORKLOADS,
    Example,
    Workload,
    generate_split,
    is_correct,
    load_tokenizer,
)
from vllm_twotower.params import AR, MASK_DIFFUSION, TwoTowerParams, resolve_params
from vllm_twotower.reference import SamplingSpec, TwoTowerModel, generate

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
#: The marked section and the plot each workload writes in ``docs/``.
SECTIONS = {"short": ("quality", "quality.png"), "long": ("quality-long", "quality-long.png")}
RETENTION_TARGET, AR_TARGET, TOKENS_TARGET = 0.987, 0.90, 3.0
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    """One configuration's results."""

    label: str
    params: TwoTowerParams
    families: tuple[str, ...]
    accuracy: dict[str, float] = field(default_factory=dict)
    nfe: int = 0
    committed: int = 0
    answer_tokens: int = 0
    blocks: int = 0  # diffusion blocks denoised (whole blocks up to the one with EOS)
    seconds: float = 0.0

    @property
    def mean(self) -> float:
        return sum(self.accuracy[f] for f in self.families) / len(self.families)

    @property
    def tokens_per_pass(self) -> float:
        """Committed tokens per model step (1 for AR: one context-tower step per token)."""
        return self.committed / self.nfe if self.nfe else 1.0

    @property
    def answer_tokens_per_pass(self) -> float:
        return self.answer_tokens / self.nfe if self.nfe else 1.0

    @property
    def passes_per_block(self) -> str:
        return f"{self.nfe / self.blocks:.2f}" if self.blocks else "–"


def evaluate(
    model: TwoTowerModel, tokenizer, examples: list[Example], row: Row, max_new_tokens: int
) -> Row:
    """Generate every example with ``row.params`` and fill in accuracy and pass counts."""
    prompts = [tokenizer.encode(e.prompt).ids for e in examples]
    start = time.perf_counter()
    results = generate(model, prompts, row.params, SamplingSpec(max_new_tokens=max_new_tokens))
    row.seconds = time.perf_counter() - start
    hits: dict[str, list[bool]] = {f: [] for f in row.families}
    for example, result in zip(examples, results, strict=True):
        text = tokenizer.decode(result.output_ids, skip_special_tokens=False)
        hits[example.family].append(is_correct(example, text))
        row.nfe += result.nfe
        row.committed += sum(result.tokens_per_step)
        row.answer_tokens += len(result.output_ids)
        if row.params.mode == MASK_DIFFUSION:
            row.blocks += -(-len(result.output_ids) // row.params.block_size)
    row.accuracy = {f: sum(h) / len(h) for f, h in hits.items() if h}
    return row


def markdown(
    rows: list[Row], checkpoint: Path, n_per_family: int, workload: Workload, max_new_tokens: int
) -> str:
    """The results section: one table row per configuration, and the verdict on the targets.

    The long set adds *passes/block*: its answers fill many blocks, so how many denoiser passes
    a block takes is what the speed-up rests on (a short answer is one block).
    """
    ar = rows[0]
    blocks = workload is LONG_WORKLOAD
    head = ["mode", *workload.families, "mean", "% of AR", "tokens/pass", "answer tok/pass"]
    head += ["passes/block", "s"] if blocks else ["s"]
    lines = [
        f"Checkpoint `{_rel(checkpoint)}`, test split, {n_per_family} prompts per family, "
        f"greedy, `max_new_tokens` {max_new_tokens}, S = 16, T = 16.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        cells = [row.label, *(f"{100 * row.accuracy[f]:.1f}" for f in workload.families)]
        cells += [
            f"**{100 * row.mean:.1f}**",
            f"{100 * row.mean / ar.mean:.1f}" if ar.mean else "–",
            f"{row.tokens_per_pass:.2f}",
            f"{row.answer_tokens_per_pass:.2f}",
            *([row.passes_per_block] if blocks else []),
            f"{row.seconds:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    main = next(
        (r for r in rows if r.params.mode == MASK_DIFFUSION and r.label.endswith("0.8")), None
    )
    verdict = [
        f"- AR mean accuracy {100 * ar.mean:.1f} % (target ≥ {100 * AR_TARGET:.0f} %): "
        + ("met" if ar.mean >= AR_TARGET else "**missed**")
    ]
    if main is not None:
        retention = main.mean / ar.mean if ar.mean else 0.0
        ok = retention >= RETENTION_TARGET and main.tokens_per_pass >= TOKENS_TARGET
        verdict.append(
            f"- diffusion γ = 0.8: {100 * retention:.1f} % of AR at "
            f"{main.tokens_per_pass:.2f} tokens/pass ({main.answer_tokens_per_pass:.2f} answer "
            f"tokens/pass) (target ≥ {100 * RETENTION_TARGET:.1f} % at ≥ {TOKENS_TARGET:.0f}): "
            + ("met" if ok else "**missed**")
        )
    png = SECTIONS[workload.name][1]
    return "\n".join([*lines, *verdict, "", f"![accuracy vs tokens per pass]({png})"])


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def plot(rows: list[Row], path: Path, checkpoint: Path) -> None:
    """Mean accuracy against tokens per pass, one point per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    diffusion = [r for r in rows if r.params.mode == MASK_DIFFUSION]
    for key, style, name in (
        ("tokens_per_pass", "o-", "committed tokens / pass"),
        ("answer_tokens_per_pass", "s--", "answer tokens / pass"),
    ):
        xs = [getattr(r, key) for r in diffusion]
        ax.plot(xs, [100 * r.mean for r in diffusion], style, label=f"diffusion ({name})")
    for r in diffusion:
        ax.annotate(
            r.label.split("=")[-1].strip(),
            (r.tokens_per_pass, 100 * r.mean),
            fontsize=8,
            textcoords="offset points",
            xytext=(4, 4),
        )
    ar = rows[0]
    ax.plot([1.0], [100 * ar.mean], "k*", markersize=12, label="AR (1 token / step)")
    ax.axhline(100 * ar.mean * RETENTION_TARGET, color="grey", lw=0.8, ls=":", label="98.7 % of AR")
    ax.set_xlabel("tokens per denoiser pass")
    ax.set_ylabel("exact-match accuracy, mean over families (%)")
    ax.set_title(f"{checkpoint.name}: accuracy vs parallelism (labels: γ)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_markdown(path: Path, section: str, name: str = "quality") -> None:
    """Replace the ``name`` section of ``path``; append it if the page has none (or create it).

    Appending, not overwriting: the long workload's first run adds its section to a page that
    already holds the short one and the hand-written text around it.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{section}\n{end}"
    if path.exists() and begin in (text := path.read_text()) and end in text:
        before, rest = text.split(begin, 1)
        path.write_text(before + block + rest.split(end, 1)[1])
    elif path.exists():
        path.write_text(f"{text.rstrip()}\n\n{block}\n")
    else:
        path.write_text(f"# Quality of the embedded checkpoint\n\n{block}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=list(WORKLOADS), default="short")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="default: the workload's embedded one"
    )
    parser.add_argument("--n-per-family", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="seed of the test-split sample")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: the workload's (32 / 208)"
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="default: docs/ (smoke: tmp)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="1 prompt per family, γ = 0.8 only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workload = WORKLOADS[args.workload]
    args.checkpoint = args.checkpoint or WORKLOAD_CHECKPOINTS[workload.name]
    args.max_new_tokens = args.max_new_tokens or workload.max_new_tokens
    if args.smoke:
        args.n_per_family, args.thresholds = 1, [0.8]
    out_dir = args.out_dir or (Path(tempfile.mkdtemp()) if args.smoke else ROOT / "docs")
    out_dir.mkdir(parents=True, exist_ok=True)

    model = TwoTowerModel.from_pretrained(args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint)
    examples = generate_split(
        "test", args.n_per_family * len(workload.families), args.seed, families=workload.families
    )
    config = model.config

    def params(**extra_args: object) -> TwoTowerParams:
        # What an engine request with these extra_args gets: the checkpoint's defaults filled in.
        return resolve_params(extra_args, config.diffusion, config.max_block_size)

    rows = [Row("ar", params(mode=AR), workload.families)]
    rows += [
        Row(
            f"diffusion γ = {g:g}",
            params(mode=MASK_DIFFUSION, confidence_threshold=g),
            workload.families,
        )
        for g in args.thresholds
    ]
    for row in rows:
        evaluate(model, tokenizer, examples, row, args.max_new_tokens)
        print(
            f"{row.label:>18}: mean {100 * row.mean:5.1f} %  tokens/pass {row.tokens_per_pass:.2f}"
            f"  answer tokens/pass {row.answer_tokens_per_pass:.2f}  ({row.seconds:.0f} s)  "
            + " ".join(f"{f} {100 * a:.0f}" for f, a in row.accuracy.items()),
            flush=True,
        )
    section, png = SECTIONS[workload.name]
    text = markdown(rows, args.checkpoint, args.n_per_family, workload, args.max_new_tokens)
    write_markdown(out_dir / "quality.md", text, section)
    plot(rows, out_dir / png, args.checkpoint)
    print(f"wrote {out_dir / 'quality.md'} and {out_dir / png}")


if __name__ == "__main__":
    main()
