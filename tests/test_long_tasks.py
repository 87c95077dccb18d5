"""The long-answer task families (``data.long_tasks``) and their splits: fast, CPU only."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from vllm_twotower.data import (
    EOS_ID,
    SPLITS,
    UNK_ID,
    Example,
    build_tokenizer,
    encode_example,
    generate_split,
    read_jsonl,
    score,
    split_of,
)
from vllm_twotower.data.__main__ import main as cli_main
from vllm_twotower.data.long_tasks import (
    CHUNK,
    LABELS,
    LONG_ANSWER_TOKENS,
    LONG_FAMILY_NAMES,
    LONG_TRAINING_ONLY_FAMILIES,
    labelled,
    unlabelled,
)
from vllm_twotower.data.tasks import FAMILY_NAMES, LONG_WORKLOAD, SHORT_WORKLOAD, WORKLOADS

N = 240  # 40 per family


@pytest.fixture(scope="module")
def splits() -> dict[str, list[Example]]:
    return {split: generate_split(split, N, seed=0, families=LONG_FAMILY_NAMES) for split in SPLITS}


@pytest.mark.parametrize(
    ("family", "prompt", "answer"),
    [
        # Payloads in labelled chunks of four (a, b, c, …), answers labelled the same way.
        ("long-copy", "copy[aQWERbTYUI]=", "aQWERbTYUI"),
        ("rot13", "rot13[aQWERbTYNZ]=", "aDJREbGLAM"),
        ("long-sort", "sort[QWERTYQ]=", "EQQRTWY"),
        # Least-significant digit first: 9999 + 1999 = 11998 → 89911, the carry in chunk b.
        ("long-add", "add[a9999+a9991]=", "a8991b1"),
        # 20011347 + 90025682 = 110037029 → 920730011.
        ("long-add", "add[a7431b1002+a2865b2009]=", "a9207b3001c1"),
        ("cumsum", "cumsum[a3141b5926]=", "a3489b4351"),
        # 30 - 8 = 22, 14, 6 (then 6 < 8 stops), three digits each, least significant first.
        ("countdown", "countdown[30,8]=", "220,410,600"),
        ("countdown", "countdown[527,8]=", ",".join(f"{v:03d}"[::-1] for v in range(519, -1, -8))),
    ],
)
def test_known_long_answers(family: str, prompt: str, answer: str) -> None:
    assert score(family, prompt, answer)
    assert score(family, prompt, answer + "<eos>junk")
    assert not score(family, prompt, answer[:-1])
    assert not score(family, prompt, answer + answer[-1])


def test_long_prompts_of_another_family_are_rejected() -> None:
    with pytest.raises(ValueError, match="does not match"):
        score("cumsum", "copy[ABC]=", "ABC")
    with pytest.raises(ValueError, match="does not match"):
        score("long-copy", "copy(ABC)=", "ABC")  # the short family's form is not the long one
    with pytest.raises(ValueError, match="does not match"):
        score("long-copy", "copy[aQWEbRTYU]=", "aQWEbRTYU")  # a chunk of three
    with pytest.raises(ValueError, match="not labelled"):
        score("rot13", "rot13[aQWERcTYUI]=", "aDJREcGLHV")  # label b skipped
    with pytest.raises(ValueError, match="differ in length"):
        score("long-add", "add[a1234b5678+a1234]=", "a2468b5678")


def test_long_answers_are_48_to_200_tokens_with_mean_at_least_80(
    splits: dict[str, list[Example]],
) -> None:
    tokenizer = build_tokenizer()
    lengths: dict[str, list[int]] = {}
    for example in (e for examples in splits.values() for e in examples):
        ids, start = encode_example(tokenizer, example)
        answer = len(ids) - start - 1  # without <eos>
        assert LONG_ANSWER_TOKENS[0] <= answer <= LONG_ANSWER_TOKENS[1], example
        lengths.setdefault(example.family, []).append(answer)
    assert set(lengths) == set(LONG_FAMILY_NAMES)
    assert statistics.mean(n for values in lengths.values() for n in values) >= 80
    # The budget holds the longest answer and its <eos> in whole blocks.
    assert LONG_WORKLOAD.max_new_tokens % 16 == 0
    assert LONG_WORKLOAD.max_new_tokens >= LONG_ANSWER_TOKENS[1] + 1


def test_tokenizer_encodes_every_long_example(splits: dict[str, list[Example]]) -> None:
    """No ``<unk>``, one token per answer character, exact round trip, separate = joint."""
    tokenizer: Tokenizer = build_tokenizer()
    ramp = generate_split("train", 120, seed=0, families=LONG_WORKLOAD.training_mix)
    for example in (*(e for examples in splits.values() for e in examples), *ramp):
        ids, start = encode_example(tokenizer, example)
        assert UNK_ID not in ids and ids[-1] == EOS_ID
        assert len(ids) - start - 1 == len(example.answer)
        assert tokenizer.encode(example.text).ids == ids[:-1]
        assert tokenizer.decode(ids) == example.text


def test_long_splits_are_disjoint_hash_into_their_split_and_are_unique(
    splits: dict[str, list[Example]],
) -> None:
    other = {s: generate_split(s, N, seed=1, families=LONG_FAMILY_NAMES) for s in SPLITS}
    prompts = {s: {e.prompt for e in splits[s] + other[s]} for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not prompts[a] & prompts[b], (a, b)
    for split, examples in splits.items():
        assert all(split_of(e.prompt) == split for e in examples)
        counts = [sum(e.family == name for e in examples) for name in LONG_FAMILY_NAMES]
        assert counts == [N // len(LONG_FAMILY_NAMES)] * len(LONG_FAMILY_NAMES)
    for split in ("validation", "test"):
        assert len({e.prompt for e in splits[split]}) == N


def test_ramp_variants_are_the_same_tasks_below_the_evaluated_lengths() -> None:
    """``-ramp`` prompts are long-family prompts (same solver) with answers under 48 tokens."""
    names = [family.name for family in LONG_TRAINING_ONLY_FAMILIES]
    assert names == [f"{name}-ramp" for name in LONG_FAMILY_NAMES]
    for example in generate_split("train", 240, seed=2, families=names):
        assert score(example.family.removesuffix("-ramp"), example.prompt, example.answer)
        assert 8 <= len(example.answer) < LONG_ANSWER_TOKENS[0], example


@pytest.mark.parametrize("items", ["QWER", "QWERTYU", "0123456789" * 10 + "1234"])
def test_labelled_round_trips_and_puts_a_label_every_four_items(items: str) -> None:
    text = labelled(items)
    assert unlabelled(text) == items
    assert text[:: CHUNK + 1] == LABELS[: len(text[:: CHUNK + 1])]
    assert len(text) == len(items) + -(-len(items) // CHUNK)
    with pytest.raises(ValueError, match="more than 26 labels"):
        labelled("A" * (CHUNK * len(LABELS) + 1))


def test_workloads_keep_the_short_set_and_add_the_long_one() -> None:
    assert WORKLOADS == {"short": SHORT_WORKLOAD, "long": LONG_WORKLOAD}
    assert SHORT_WORKLOAD.families == FAMILY_NAMES and SHORT_WORKLOAD.max_new_tokens == 32
    assert not set(LONG_WORKLOAD.families) & set(FAMILY_NAMES)
    mix = LONG_WORKLOAD.training_mix
    assert set(mix) == {*LONG_FAMILY_NAMES, *(f"{n}-ramp" for n in LONG_FAMILY_NAMES)}
    assert all(mix.count(name) == 1 for name in mix)  # half of each share is the ramp variant


def test_cli_writes_the_long_workload(tmp_path: Path) -> None:
    cli_main(["--out", str(tmp_path), "--workload", "long", "--n-train", "24", "--n-val", "12"])
    train = generate_split("train", 24, seed=0, families=LONG_WORKLOAD.training_mix)
    assert read_jsonl(tmp_path / "train.jsonl") == train
    test = read_jsonl(tmp_path / "test.jsonl")
    assert {e.family for e in test} == set(LONG_FAMILY_NAMES)
