"""``python -m vllm_twotower.train --out DIR --seed 0 ...``: train a TwoTower model on the tasks."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import torch

from vllm_twotower.train.trainer import TrainSettings, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument(
        "--log", type=Path, default=None, help="JSON-lines loss log (default: runs/)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from this checkpoint (e.g. --stages diffusion on a trained context tower)",
    )
    parser.add_argument(
        "--stages", default="ar,diffusion", help="comma-separated subset of ar,diffusion"
    )
    defaults = TrainSettings()
    for f in fields(TrainSettings):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(
                flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default
            )
        else:
            parser.add_argument(flag, type=type(default), default=default)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings)})
    log = args.log or Path("runs") / f"train-{args.out.name}-seed{settings.seed}.jsonl"
    train(
        settings,
        args.out,
        log_path=log,
        stages=tuple(args.stages.split(",")),
        device=args.device,
        init_from=args.init_from,
    )
    print(f"wrote {args.out} (loss log: {log})")


if __name__ == "__main__":
    main()
