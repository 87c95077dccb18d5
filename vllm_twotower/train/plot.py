"""``python -m vllm_twotower.train.plot LOG.jsonl OUT.png``: loss curves of a training run.

Reads the JSON-lines log :mod:`vllm_twotower.train.trainer` writes and draws, per stage, the
training loss (smoothed over 10 logged points) and the validation loss at each evaluation.
Needs matplotlib (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TITLES = {
    "ar": "stage 1: context tower (AR, answer tokens)",
    "diffusion": "stage 2: denoiser (MDLM, masked positions)",
}


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    plot(load(args.log), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
