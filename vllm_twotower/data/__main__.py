"""``python -m vllm_twotower.data --out DIR``: write the task splits as JSONL and the tokenizer.

Output layout (everything a training run needs, reproducible from ``--seed``)::

    DIR/train.jsonl  DIR/validation.jsonl  DIR/test.jsonl   one {"family","prompt","answer"} a line
    DIR/tokenizer/                                          tokenizer.json + configs
    DIR/meta.json                                           seed, counts, vocab size, families
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from vllm_twotower.data.tasks import FAMILY_BY_NAME, WORKLOADS, iter_split, write_jsonl
from vllm_twotower.data.tokenizer import save_tokenizer, vocab_size


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vllm_twotower.data", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=200_000)
    parser.add_argument("--n-val", type=int, default=2_000)
    parser.add_argument("--n-test", type=int, default=2_000)
    parser.add_argument(
        "--workload",
        choices=list(WORKLOADS),
        default="short",
        help="task set: short answers (2-13 tokens) or long ones (48-200 tokens)",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        choices=list(FAMILY_BY_NAME),
        default=None,
        help="task families of every split (default: what training and evaluation use: "
        "train.jsonl the workload's training mix, the other splits its evaluated families)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Generate every split and the tokenizer into ``--out``."""
    args = _parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": args.n_train, "validation": args.n_val, "test": args.n_test}
    workload = WORKLOADS[args.workload]
    families = {
        split: args.families or (workload.training_mix if split == "train" else workload.families)
        for split in sizes
    }
    for split, n in sizes.items():
        stream = iter_split(split, n, args.seed, families=families[split])
        write_jsonl(args.out / f"{split}.jsonl", tqdm(stream, total=n, desc=split, unit="ex"))
    save_tokenizer(args.out / "tokenizer")
    meta = {
        "seed": args.seed,
        "sizes": sizes,
        "families": families,
        "vocab_size": vocab_size(),
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {sum(sizes.values())} examples and the tokenizer to {args.out}")


if __name__ == "__main__":
    main()
