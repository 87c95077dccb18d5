"""Synthetic task data and the tiny tokenizer (``vllm_twotower.data``): fast, CPU only."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from vllm_twotower.data import (
    BOS_ID,
    DIFFUSION_REPEATS,
    EOS_ID,
    FAMILIES,
    FAMILY_NAMES,
    KEYWORDS,
    MASK_ID,
    PAD_ID,
    SPLITS,
    TRAINING_MIX,
    Example,
    accuracy_by_family,
    build_tokenizer,
    encode_example,
    generate_split,
    is_correct,
    load_tokenizer,
    read_jsonl,
    save_tokenizer,
    score,
    split_of,
    vocab_size,
)
from vllm_twotower.data.__main__ import main as cli_main
from vllm_twotower.data.tokenizer import CHARSET, MAX_VOCAB, TOKENIZER_FILES

N = 400
MAX_PROMPT_TOKENS = 48  # including <bos>
MAX_ANSWER_TOKENS = 24  # including <eos>


@pytest.fixture(scope="module")
def splits() -> dict[str, list[Example]]:
    return {split: generate_split(split, N, seed=0) for split in SPLITS}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return build_tokenizer()


# --------------------------------------------------------------------------- splits


def test_splits_are_disjoint_across_seeds(splits: dict[str, list[Example]]) -> None:
    other_seed = {split: generate_split(split, N, seed=1) for split in SPLITS}
    prompts = {split: {e.prompt for e in splits[split] + other_seed[split]} for split in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not prompts[a] & prompts[b], (a, b)


def test_examples_hash_into_their_split(splits: dict[str, list[Example]]) -> None:
    for split, examples in splits.items():
        assert all(split_of(e.prompt) == split for e in examples)


def test_deterministic_for_a_seed(splits: dict[str, list[Example]]) -> None:
    assert generate_split("test", N, seed=0) == splits["test"]
    assert generate_split("test", N, seed=1) != splits["test"]
    # A prefix of a longer request is the shorter request (streaming generation).
    assert generate_split("train", 2 * N, seed=0)[:N] == splits["train"]


def test_evaluation_splits_have_unique_prompts(splits: dict[str, list[Example]]) -> None:
    for split in ("validation", "test"):
        assert len({e.prompt for e in splits[split]}) == N


def test_every_family_present_and_balanced(splits: dict[str, list[Example]]) -> None:
    for examples in splits.values():
        counts = {name: sum(e.family == name for e in examples) for name in FAMILY_NAMES}
        assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_family_subset() -> None:
    examples = generate_split("train", 20, seed=3, families=["add", "reverse"])
    assert {e.family for e in examples} == {"add", "reverse"}


def test_training_mix_keeps_family_shares_and_hides_rep_variants() -> None:
    """Every evaluated family keeps 1/8 of training; copy and recall split theirs with ``-rep``."""
    examples = generate_split("train", 16 * 40, seed=0, families=TRAINING_MIX)
    counts = {name: sum(e.family == name for e in examples) for name in TRAINING_MIX}
    assert counts["add"] == counts["copy"] + counts["copy-rep"] == 80
    assert counts["copy-rep"] == counts["recall-rep"] == 40
    assert all(split_of(e.prompt) == "train" for e in examples)
    evaluated = generate_split("test", 8 * 50, seed=0)
    assert {e.family for e in evaluated} == set(FAMILY_NAMES)
    assert set(DIFFUSION_REPEATS) <= set(TRAINING_MIX)  # stage 2 repeats only drawn families


def test_rep_payloads_repeat_few_letters_in_the_evaluated_form() -> None:
    """``-rep`` prompts are copy / recall prompts (same solver) over 2–4 distinct letters."""
    for example in generate_split("train", 200, seed=1, families=["copy-rep", "recall-rep"]):
        assert score(example.family.removesuffix("-rep"), example.prompt, example.answer)
        payloads = re.findall(r"copy\(([A-Z]+)\)|=([A-Z]+);", example.prompt)
        letters = {c for groups in payloads for payload in groups for c in payload}
        assert 1 <= len(letters) <= 4, example


#: The first test-split examples of seed 0 and a digest of 400 examples per split, as they were
#: before the long families were added: the short set must not move by a byte.
FIRST_TEST_EXAMPLES = [
    ("count", "count(C,CEADADCAA)=", "2"),
    ("sort", "sort(OCFBVROV)=", "BCFOORVV"),
    ("reverse", "rev(AJHYSAJJDX)=", "XDJJASYHJA"),
    ("add", "368+3=", "173"),
    ("code", "def f(x,y):return x+y;f(11,75)=", "68"),
    ("recall", "H=NVGY;C=ONVC;O=BN;Z=QL;get(O)=", "BN"),
    ("copy", "copy(BMKELQFAVH)=", "BMKELQFAVH"),
    ("sub", "769-126=", "346"),
]
SPLIT_DIGESTS = {
    "train": "e057378ea244c9a77fe7cc4cf549dc425c76ca6839d736c3f543eb3e87a51c61",
    "validation": "81521706c891c57313bbf049f12de62d91fde7a48a812a1370c94222e5a08e25",
    "test": "758d4a8296a7f4c8fc1255ed8fa3662502ddcfba9b3c9b83f20dfe898e7c3141",
    "training mix": "27acb0182f57e4fe08cbdb53b472c16725e608a7f6a833c99d015fdc5764691d",
}


def test_short_splits_are_unchanged(splits: dict[str, list[Example]]) -> None:
    assert [tuple(e) for e in generate_split("test", 8, seed=0)] == FIRST_TEST_EXAMPLES
    drawn = {**splits, "training mix": generate_split("train", N, seed=0, families=TRAINING_MIX)}
    digests = {
        name: hashlib.sha256(json.dumps([list(e) for e in examples]).encode()).hexdigest()
        for name, examples in drawn.items()
    }
    assert digests == SPLIT_DIGESTS


def test_unknown_split_rejected() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        generate_split("dev", 1, seed=0)


# --------------------------------------------------------------------------- checking


@pytest.mark.parametrize(
    ("family", "prompt", "answer"),
    [
        ("add", "347+58=", "504"),
        ("sub", "347-58=", "982"),
        ("copy", "copy(QWERTY)=", "QWERTY"),
        ("reverse", "rev(QWERTY)=", "YTREWQ"),
        ("sort", "sort(QWERTY)=", "EQRTWY"),
        ("count", "count(B,ABBCEB)=", "3"),
        ("recall", "K=QX;B=MRT;C=PZ;get(B)=", "MRT"),
        ("code", "def f(x,y):return x-y+3;f(12,7)=", "8"),
        ("code", "def f(x,y):return y-x-x;f(9,0)=", "-81"),
        ("code", "def f(x,y):return x-y;f(30,3)=", "72"),
    ],
)
def test_known_answers(family: str, prompt: str, answer: str) -> None:
    assert score(family, prompt, answer)
    assert not score(family, prompt, answer + "0")


def test_answers_verify_and_wrong_answers_fail(splits: dict[str, list[Example]]) -> None:
    for example in (e for examples in splits.values() for e in examples):
        assert is_correct(example, example.answer)
        assert score(example.family, example.prompt, example.answer)
        assert is_correct(example, example.answer + "<eos>GARBAGE")
        assert is_correct(example, example.answer + " \n")
        assert not is_correct(example, example.answer[:-1])
        assert not is_correct(example, example.answer + "1")
        assert not score(example.family, example.prompt, "Z" + example.answer)


def test_accuracy_by_family(splits: dict[str, list[Example]]) -> None:
    examples = splits["test"][: 2 * len(FAMILIES)]
    generations = [e.answer if i % 2 else "?" for i, e in enumerate(examples)]
    accuracy = accuracy_by_family(examples, generations)
    assert accuracy["all"] == pytest.approx(0.5)
    assert set(accuracy) == {*FAMILY_NAMES, "all"}


def test_malformed_prompt_rejected() -> None:
    with pytest.raises(ValueError, match="does not match"):
        score("add", "rev(ABC)=", "CBA")


# --------------------------------------------------------------------------- tokenizer


def test_special_ids(tokenizer: Tokenizer) -> None:
    expected = {"<pad>": PAD_ID, "<bos>": BOS_ID, "<eos>": EOS_ID, "<mask>": MASK_ID}
    assert expected == {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<mask>": 3}
    for token, i in expected.items():
        assert tokenizer.token_to_id(token) == i
    assert vocab_size(tokenizer) <= MAX_VOCAB


def test_digits_and_keywords_are_single_tokens(tokenizer: Tokenizer) -> None:
    for text in (*"0123456789", *KEYWORDS):
        assert len(tokenizer.encode(text, add_special_tokens=False).ids) == 1, text


def test_examples_round_trip_within_length_bounds(
    tokenizer: Tokenizer,
    splits: dict[str, list[Example]],
) -> None:
    for example in (e for examples in splits.values() for e in examples):
        ids, n_prompt = encode_example(tokenizer, example)
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID
        assert n_prompt <= MAX_PROMPT_TOKENS and len(ids) - n_prompt <= MAX_ANSWER_TOKENS
        # Separate prompt/answer encoding equals encoding the full text at once.
        assert tokenizer.encode(example.text).ids == ids[:-1]
        assert tokenizer.decode(ids) == example.text
        assert tokenizer.decode(ids[n_prompt:]) == example.answer


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=CHARSET, max_size=80))
def test_any_charset_text_round_trips(text: str) -> None:
    tokenizer = build_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == "<bos>" + text


def test_saved_tokenizer_reloads(tmp_path: Path, tokenizer: Tokenizer) -> None:
    save_tokenizer(tmp_path, tokenizer)
    assert all((tmp_path / name).is_file() for name in TOKENIZER_FILES)
    assert load_tokenizer(tmp_path).to_str() == tokenizer.to_str()


def test_auto_tokenizer_loads_saved_dir(tmp_path: Path, splits: dict[str, list[Example]]) -> None:
    transformers = pytest.importorskip("transformers")
    save_tokenizer(tmp_path)
    for loader in (transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast):
        hf = loader.from_pretrained(str(tmp_path))
        special = (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.mask_token_id)
        assert special == (0, 1, 2, 3)
        for example in splits["test"][:50]:
            ids = hf(example.text)["input_ids"]
            assert ids == encode_example(build_tokenizer(), example)[0][:-1]
            assert hf.decode(ids, skip_special_tokens=True) == example.text
        assert hf.decode(hf(" a , b  ")["input_ids"], skip_special_tokens=True) == " a , b  "


# --------------------------------------------------------------------------- CLI


def test_cli_writes_splits_and_tokenizer(tmp_path: Path) -> None:
    cli_main(["--out", str(tmp_path), "--seed", "5", "--n-train", "40", "--n-val", "16"])
    train = generate_split("train", 40, seed=5, families=TRAINING_MIX)
    assert read_jsonl(tmp_path / "train.jsonl") == train
    assert len(read_jsonl(tmp_path / "validation.jsonl")) == 16
    assert all((tmp_path / "tokenizer" / name).is_file() for name in TOKENIZER_FILES)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["seed"] == 5 and meta["vocab_size"] == vocab_size()


def test_chat_template_renders_the_trained_prompt_format(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = build_tokenizer()
    hf = transformers.AutoTokenizer.from_pretrained(str(save_tokenizer(tmp_path, tokenizer)))
    one_turn = [{"role": "user", "content": "copy(ABC)="}]
    rendered = hf.apply_chat_template(one_turn, tokenize=False, add_generation_prompt=True)
    assert rendered == "<bos>copy(ABC)="
    assert hf(rendered, add_special_tokens=False).input_ids == tokenizer.encode("copy(ABC)=").ids
    turns = [*one_turn, {"role": "assistant", "content": "ABC"}, {"role": "user", "content": "x"}]
    assert hf.apply_chat_template(turns, tokenize=False) == "<bos>copy(ABC)=ABC<eos>x"
