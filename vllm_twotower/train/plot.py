"""``python -m vllm_twotower.train.plot LOG.jsonl [LOG.jsonl ...] OUT.png``: training curves.

Reads the JSON-lines logs :mod:`vllm_twotower.train.trainer` writes (several when a stage was
rerun alone with ``--init-from``) and draws, per stage, the training loss (smoothed over 10
logged points), the validation loss at each evaluation and, on a second axis, the validation
exact match that stage is judged by: teacher-forced greedy for the AR stage, greedy mask
diffusion decoding for the denoiser.  Needs matplotlib (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TITLES = {
    "ar": "stage 1: context tower (AR, answer tokens)",
    "diffusion": "stage 2: denoiser (MDLM, masked positions)",
}
#: Per stage: the logged exact-match key and its legend label.
EXACT_MATCH = {
    "ar": ("acc_mean", "exact match (AR greedy)"),
    "diffusion": ("dec_mean", "exact match (mask-diffusion decoding)"),
}


def load(paths: list[Path]) -> list[dict]:
    """The records of several logs; a stage a later log trained replaces earlier logs' run of it."""
    records: list[dict] = []
    for path in paths:
        new = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rerun = {r["stage"] for r in new if "loss" in r}
        records = [r for r in records if r.get("stage") not in rerun] + new
    return records


def plot(records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in ("ar", "diffusion") if any(r.get("stage") == s for r in records)]
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        train = [r for r in records if r.get("stage") == stage and "loss" in r]
        steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
        windows = [losses[max(0, i - 9) : i + 1] for i in range(len(losses))]
        smooth = [sum(w) / len(w) for w in windows]
        ax.plot(steps, losses, color="C0", alpha=0.25, lw=0.8)
        ax.plot(steps, smooth, color="C0", label="train")
        val = [r for r in records if r.get("stage") == stage and "val_loss" in r]
        val_steps, val_losses = [r["step"] for r in val], [r["val_loss"] for r in val]
        ax.plot(val_steps, val_losses, "o-", color="C1", label="validation")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.set_title(TITLES[stage], fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower left")
        key, label = EXACT_MATCH[stage]
        scored = [r for r in val if key in r]
        if scored:
            right = ax.twinx()
            right.plot([r["step"] for r in scored], [100 * r[key] for r in scored], "s--",
                       color="C2", label=label)  # fmt: skip
            right.set_ylim(0, 100)
            right.set_ylabel("validation exact match (%)")
            right.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logs", type=Path, nargs="+", metavar="LOG")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    plot(load(args.logs), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
