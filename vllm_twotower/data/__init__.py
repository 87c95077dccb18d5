"""Synthetic, exactly checkable training data and a tiny tokenizer for small TwoTower models.

* :mod:`~vllm_twotower.data.tasks` — task families, seeded disjoint splits, exact-match checks,
  and the two workloads: short answers (2–13 tokens) and long ones
  (:mod:`~vllm_twotower.data.long_tasks`, 48–200 tokens);
* :mod:`~vllm_twotower.data.tokenizer` — a fixed character-level tokenizer in Hugging Face form
  (mask id 3, as the TwoTower engine expects);
* ``python -m vllm_twotower.data --out DIR`` writes the splits as JSONL plus the tokenizer.
"""

from __future__ import annotations

from vllm_twotower.data.specials import (
    BOS_ID,
    BOS_TOKEN,
    EOS_ID,
    EOS_TOKEN,
    MASK_ID,
    MASK_TOKEN,
    PAD_ID,
    PAD_TOKEN,
    UNK_ID,
    UNK_TOKEN,
)
from vllm_twotower.data.tasks import (
    DIFFUSION_REPEATS,
    FAMILIES,
    FAMILY_NAMES,
    KEYWORDS,
    LONG_WORKLOAD,
    SHORT_WORKLOAD,
    SPLITS,
    TRAINING_MIX,
    WORKLOADS,
    Example,
    Family,
    Workload,
    accuracy_by_family,
    generate_split,
    is_correct,
    iter_split,
    normalize_generation,
    read_jsonl,
    score,
    split_of,
    write_jsonl,
)
from vllm_twotower.data.tokenizer import (
    build_tokenizer,
    encode_example,
    load_tokenizer,
    save_tokenizer,
    vocab_size,
)

__all__ = [
    "BOS_ID",
    "BOS_TOKEN",
    "DIFFUSION_REPEATS",
    "EOS_ID",
    "EOS_TOKEN",
    "FAMILIES",
    "FAMILY_NAMES",
    "KEYWORDS",
    "LONG_WORKLOAD",
    "MASK_ID",
    "MASK_TOKEN",
    "PAD_ID",
    "PAD_TOKEN",
    "SHORT_WORKLOAD",
    "SPLITS",
    "TRAINING_MIX",
    "UNK_ID",
    "UNK_TOKEN",
    "WORKLOADS",
    "Example",
    "Family",
    "Workload",
    "accuracy_by_family",
    "build_tokenizer",
    "encode_example",
    "generate_split",
    "is_correct",
    "iter_split",
    "load_tokenizer",
    "normalize_generation",
    "read_jsonl",
    "save_tokenizer",
    "score",
    "split_of",
    "vocab_size",
    "write_jsonl",
]
