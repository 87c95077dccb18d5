"""First-pass calibration: how often the denoiser is right when it is confident.

    python benchmarks/calibration.py [--checkpoint DIR] [--n-per-family 100] [--smoke] [--no-write]

The commit rule decides every masked position whose confidence beats γ, so mask diffusion at
γ keeps the AR accuracy only while the denoiser's confidences are *calibrated*: a position
decided at confidence above 0.8 must be right more than 80 % of the time, or the answer
breaks.  The pass most exposed is a block's first: every position is masked, and each must
work out its offset in the block from the Mamba scan alone (TwoTower has no positional
encoding).

This runs that pass on every test-split prompt (the first block after the prompt, as
served: ``t = 1``, the context tower's state after the prompt) and compares each position's
prediction with the answer, up to and including its ``<eos>``.  Three tables: the precision
of what the first pass would commit at each γ, per family; accuracy against confidence over
all answer positions (a reliability table); and accuracy by offset in the block, per family,
which tells a position that cannot find its offset from one that cannot find its letter.  They
go between the ``calibration`` markers of ``docs/quality.md``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from docsections import QUALITY, replace_section
from tokenizers import Tokenizer

from vllm_twotower.checkpoints import DEFAULT_CHECKPOINT
from vllm_twotower.commit import predict
from vllm_twotower.data import FAMILY_NAMES, MASK_ID, Example, generate_split, load_tokenizer
from vllm_twotower.reference import TwoTowerModel
from vllm_twotower.train.batching import encode_all
from vllm_twotower.train.objectives import context_state, denoiser_logits

THRESHOLDS = (0.5, 0.8, 0.9, 0.95)
#: Upper edges of the reliability table's confidence bins (the first starts at 0).
BIN_EDGES = (0.5, 0.8, 0.9, 0.95, 0.99, 1.0)
#: Block offsets of the offset table; the last column pools this offset and those after it.
OFFSETS = 9


@dataclass
class Predictions:
    """Confidence and correctness of every answer position's first-pass prediction."""

    confidence: dict[str, list[float]] = field(default_factory=dict)
    correct: dict[str, list[bool]] = field(default_factory=dict)
    offset: dict[str, list[int]] = field(default_factory=dict)

    def add(self, family: str, confidence: list[float], correct: list[bool]) -> None:
        """One answer's positions, from block offset 0 on."""
        self.confidence.setdefault(family, []).extend(confidence)
        self.correct.setdefault(family, []).extend(correct)
        self.offset.setdefault(family, []).extend(range(len(correct)))

    def pairs(self, families: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(confidence, correct)`` over ``families``' positions."""
        conf = [c for f in families for c in self.confidence.get(f, [])]
        ok = [c for f in families for c in self.correct.get(f, [])]
        return torch.tensor(conf, dtype=torch.float64), torch.tensor(ok, dtype=torch.bool)


@torch.no_grad()
def first_pass(model: TwoTowerModel, tokenizer: Tokenizer, examples: list[Example]) -> Predictions:
    """Predictions of each prompt's first denoiser pass, batched by prompt length."""
    size = model.config.chunk_size
    by_length: dict[int, list[tuple[str, tuple[int, ...], tuple[int, ...]]]] = {}
    for example, item in zip(examples, encode_all(tokenizer, examples), strict=True):
        prompt, answer = item.ids[: item.answer_start], item.ids[item.answer_start :]
        by_length.setdefault(len(prompt), []).append((example.family, prompt, answer[:size]))
    out = Predictions()
    for group in by_length.values():
        prompts = torch.tensor([prompt for _, prompt, _ in group])
        canvas = torch.full((len(group), size), MASK_ID)
        logits = denoiser_logits(model, canvas, context_state(model, prompts))
        greedy = torch.zeros(logits.shape[:-1])
        predicted, confidence = predict(logits, mask_id=MASK_ID, temperature=greedy, row_keys=None)
        for row, (family, _, answer) in enumerate(group):
            n = len(answer)  # the answer and its <eos> (what the server returns)
            truth = torch.tensor(answer)
            out.add(
                family,
                confidence[row, :n].tolist(),
                (predicted[row, :n] == truth).tolist(),
            )
    return out


def precision_table(predictions: Predictions) -> list[str]:
    """Per family: how many answer positions the first pass commits at each γ, and how many
    of those are right."""
    head = ["family", *(f"γ = {g:g}: committed / right" for g in THRESHOLDS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, families in [*((f, [f]) for f in FAMILY_NAMES), ("all", list(FAMILY_NAMES))]:
        confidence, correct = predictions.pairs(families)
        cells = [label]
        for gamma in THRESHOLDS:
            chosen = confidence > gamma
            n = int(chosen.sum())
            right = int(correct[chosen].sum())
            share = f"{100 * right / n:.1f} %" if n else "–"
            cells.append(f"{100 * n / max(1, len(confidence)):.0f} % / {share}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


#: Family groups of the reliability table: all, and the two that copy letters from offsets.
GROUPS = (("all families", tuple(FAMILY_NAMES)), ("copy + recall", ("copy", "recall")))


def reliability_table(predictions: Predictions) -> list[str]:
    """Accuracy against confidence over the answer positions of each of :data:`GROUPS`."""
    head = ["confidence"]
    for name, _ in GROUPS:
        head += [f"{name}: positions", "mean confidence", "accuracy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pairs = [predictions.pairs(list(families)) for _, families in GROUPS]
    low = 0.0
    for high in BIN_EDGES:
        cells = [f"({low:g}, {high:g}]"]
        for confidence, correct in pairs:
            inside = (confidence > low) & (confidence <= high)
            n = int(inside.sum())
            if n:
                cells += [
                    str(n),
                    f"{100 * float(confidence[inside].mean()):.1f} %",
                    f"{100 * float(correct[inside].float().mean()):.1f} %",
                ]
            else:
                cells += ["0", "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
        low = high
    return lines


def offset_table(predictions: Predictions) -> list[str]:
    """Per family, the share of answer positions predicted right at each block offset."""
    labels = [str(i) for i in range(OFFSETS - 1)] + [f"{OFFSETS - 1}+"]
    lines = ["| family \\ offset | " + " | ".join(labels) + " |", "|" + "---|" * (OFFSETS + 1)]
    for family in FAMILY_NAMES:
        offsets = torch.tensor(predictions.offset.get(family, [])).clamp(max=OFFSETS - 1)
        correct = torch.tensor(predictions.correct.get(family, []), dtype=torch.bool)
        cells = [family]
        for offset in range(OFFSETS):
            at = offsets == offset
            cells.append(f"{100 * float(correct[at].float().mean()):.0f}" if bool(at.any()) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(predictions: Predictions, checkpoint: Path, n_per_family: int) -> str:
    return "\n".join(
        [
            f"Checkpoint `{checkpoint.name}`, test split, {n_per_family} prompts per family: the "
            "first denoiser pass of the first block (all 16 positions masked), over the answer "
            "positions up to and including `<eos>`.",
            "",
            "*Committed*: share of answer positions whose confidence beats γ (the first pass "
            "commits at least those); *right*: share of them that are correct.",
            "",
            *precision_table(predictions),
            "",
            *reliability_table(predictions),
            "",
            "Answer positions predicted right by the first pass (%), by offset in the block:",
            "",
            *offset_table(predictions),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--n-per-family", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="seed of the test-split sample")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="2 prompts per family")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.n_per_family = 2
    model = TwoTowerModel.from_pretrained(args.checkpoint).eval()
    tokenizer = load_tokenizer(args.checkpoint)
    examples = generate_split("test", args.n_per_family * len(FAMILY_NAMES), args.seed)
    section = markdown(first_pass(model, tokenizer, examples), args.checkpoint, args.n_per_family)
    print(section)
    if not args.no_write:
        replace_section("calibration", section, page=QUALITY)
        print(f"wrote {QUALITY}")


if __name__ == "__main__":
    main()
