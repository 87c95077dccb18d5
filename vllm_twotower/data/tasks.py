"""Seeded synthetic tasks with exactly checkable answers, for training a tiny TwoTower model.

Why synthetic: the model we train here has a few million parameters per tower and < 1 hour of
CPU, far too little for natural text, yet the serving stack still needs a checkpoint whose
outputs can be *verified* (greedy AR vs. block diffusion, exact-match accuracy).  Every family
below is a deterministic function of its prompt that a small hybrid Mamba/attention model can
learn: copying, reversing, sorting, recall, counting and short arithmetic.  Multiplication and
other operations needing long carries are deliberately left out.

One generic mechanism serves all families: a :class:`Family` is a ``sample`` function (random
prompt) plus a ``solve`` function that *parses the prompt text* and computes the answer.  The
answer stored in an :class:`Example` is ``solve(prompt)``, so the checker :func:`score` needs
only the prompt, and any generator/solver disagreement would show up as a parse failure.

Formats are short and regular (prompt ≤ ~40 tokens, answer ≤ 13 tokens with the tokenizer of
:mod:`vllm_twotower.data.tokenizer`); the model sees ``<bos> prompt answer <eos>``.
Arithmetic answers (add, sub, code) are written **least-significant digit first** (``405`` as
``504``, ``-18`` as ``-81``, see :func:`lsd_first`):

=======  ====================================  ==========
family   prompt                                answer
=======  ====================================  ==========
add      ``347+58=``                           ``504`` (405)
sub      ``347-58=``                           ``982`` (289)
copy     ``copy(QWERTY)=``                     ``QWERTY``
reverse  ``rev(QWERTY)=``                      ``YTREWQ``
sort     ``sort(QWERTY)=``                     ``EQRTWY``
count    ``count(B,ABBCEB)=``                  ``3``
recall   ``K=QX;B=MRT;C=PZ;get(B)=``           ``MRT``
code     ``def f(x,y):return x-y+3;f(12,7)=``  ``8``
=======  ====================================  ==========

Why least-significant digit first: a model writes left to right, and each digit of a sum
depends on the digits to its *right* (the carry).  Most-significant first, the first digit it
emits depends on every carry below it; least-significant first, each digit needs only the two
operand digits at its position and the carry it has just produced — a local rule a small model
learns several times faster (in a side-by-side 1 000-step run on the arithmetic families, add
went from 12 % to 37 % and sub from 14 % to 56 % exact match).  Prompts keep the usual order.

Training also draws two training-only variants, ``copy-rep`` and ``recall-rep``: the same
prompts over 2–4 distinct letters, which teach lookup by offset (see
:data:`TRAINING_ONLY_FAMILIES`); :data:`TRAINING_MIX` is the training draw, :data:`FAMILY_NAMES`
the evaluated families.

Payloads use only upper-case letters, digits and punctuation, while the fixed template words
(``copy(``, ``def f(x,y):return `` …, see :data:`KEYWORDS`) each contain a lower-case letter or
``)``, which payloads never do; the tokenizer turns each template word into one token, and this
separation guarantees a template word can never match inside a payload.

The long-answer families (48–200 tokens, :mod:`~vllm_twotower.data.long_tasks`) are drawn,
split and scored by the same mechanism; a :class:`Workload` names which set a run trains,
evaluates or benchmarks (:data:`WORKLOADS`: ``short``, these families, and ``long``).  Adding
them changed no short example: the short draws never look at the long families.

Splits are decided by a salted hash of the prompt text alone (independent of the seed), so no
prompt can occur in two splits, whatever seeds the splits were generated with.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm_twotower.data.family import (
    LETTERS,
    Example,
    Family,
    lsd_first,
    parse_prompt,
    payload_family,
    random_letters,
)
from vllm_twotower.data.long_tasks import (
    LONG_ANSWER_TOKENS,
    LONG_FAMILIES,
    LONG_FAMILY_NAMES,
    LONG_TRAINING_ONLY_FAMILIES,
)
from vllm_twotower.data.specials import EOS_TOKEN, PAD_TOKEN

#: Small alphabet for ``count`` so that counts spread over 0..12 instead of being mostly 0/1.
COUNT_ALPHABET = "ABCDE"
MAX_DIGITS = 3
SEQ_LEN = (3, 12)
SORT_LEN = (3, 10)
COUNT_LEN = (5, 12)
RECALL_PAIRS = (2, 5)
RECALL_VALUE_LEN = (2, 4)
#: Letters available to one payload of the training-only ``*-rep`` families (see there).
REPEAT_ALPHABET_SIZE = (2, 4)

#: Split name → fraction of the prompt space.  Order matters: it fixes the hash buckets.
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.90, "validation": 0.05, "test": 0.05}
SPLITS: tuple[str, ...] = tuple(SPLIT_FRACTIONS)
_SPLIT_SALT = b"vllm-twotower-split-v1"
#: Rejection-sampling attempts allowed for one example before the family is declared exhausted.
_MAX_ATTEMPTS = 100_000


# --------------------------------------------------------------------------- helpers


def _all_letters(rng: random.Random) -> str:
    """The payload alphabet of the evaluated families: every upper-case letter."""
    return LETTERS


def _few_letters(rng: random.Random) -> str:
    """2–4 distinct random letters: a payload over them repeats letters many times."""
    return "".join(rng.sample(LETTERS, rng.randint(*REPEAT_ALPHABET_SIZE)))


def _number(rng: random.Random, max_digits: int) -> int:
    """A number whose digit count is uniform in 1..max_digits (so short numbers are common)."""
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _eval_terms(expr: str, env: dict[str, int]) -> int:
    """Evaluate a sum of signed terms (``x-y+3``) without ``eval``."""
    total = 0
    for sign, term in re.findall(r"([+-]?)(\w+)", expr):
        value = env[term] if term in env else int(term)
        total += -value if sign == "-" else value
    return total


# --------------------------------------------------------------------------- arithmetic

_ARITH = re.compile(r"(\d+)([+-])(\d+)=")


def _sample_add(rng: random.Random) -> str:
    return f"{_number(rng, MAX_DIGITS)}+{_number(rng, MAX_DIGITS)}="


def _sample_sub(rng: random.Random) -> str:
    """Subtraction with a non-negative result, so answers stay digit strings."""
    a, b = sorted((_number(rng, MAX_DIGITS), _number(rng, MAX_DIGITS)), reverse=True)
    return f"{a}-{b}="


def _solve_arith(prompt: str) -> str:
    a, op, b = parse_prompt(_ARITH, prompt)
    return lsd_first(int(a) + int(b) if op == "+" else int(a) - int(b))


# --------------------------------------------------------------------------- sequences


def _sequence_family(
    name: str,
    keyword: str,
    length: tuple[int, int],
    fn: Callable[[str], str],
    alphabet: Callable[[random.Random], str] = _all_letters,
) -> Family:
    """A family ``keyword(SEQ)=`` → ``fn(SEQ)``: copy, reverse and sort differ only in ``fn``."""
    keywords = (f"{keyword}(", ")=")
    return payload_family(name, f"{keyword}({{}})=", length, fn, alphabet, keywords=keywords)


# --------------------------------------------------------------------------- count

_COUNT = re.compile(r"count\(([A-Z]),([A-Z]+)\)=")


def _sample_count(rng: random.Random) -> str:
    return f"count({rng.choice(COUNT_ALPHABET)},{random_letters(rng, COUNT_LEN, COUNT_ALPHABET)})="


def _solve_count(prompt: str) -> str:
    target, text = parse_prompt(_COUNT, prompt)
    return str(text.count(target))


# --------------------------------------------------------------------------- recall

_RECALL = re.compile(r"((?:[A-Z]=[A-Z]+;)+)get\(([A-Z])\)=")


def _recall_sampler(alphabet: Callable[[random.Random], str]) -> Callable[[random.Random], str]:
    """Prompts of distinct single-letter keys with values over ``alphabet(rng)``, then a query."""

    def sample(rng: random.Random) -> str:
        keys = rng.sample(LETTERS, rng.randint(*RECALL_PAIRS))
        values = alphabet(rng)
        passage = "".join(f"{key}={random_letters(rng, RECALL_VALUE_LEN, values)};" for key in keys)
        return f"{passage}get({rng.choice(keys)})="

    return sample


def _solve_recall(prompt: str) -> str:
    passage, key = parse_prompt(_RECALL, prompt)
    values = dict(pair.split("=") for pair in passage.rstrip(";").split(";"))
    return values[key]


# --------------------------------------------------------------------------- code

_CODE = re.compile(r"def f\(x,y\):return ([-+xy0-9]+);f\((\d+),(\d+)\)=")


def _sample_code(rng: random.Random) -> str:
    """``def f(x,y):return <2-3 signed terms>;f(a,b)=`` with 1-2 digit arguments."""
    extra = "".join(
        rng.choice("+-") + rng.choice(("x", "y", str(rng.randint(1, 9))))
        for _ in range(rng.randint(1, 2))
    )
    expr = rng.choice("xy") + extra
    return f"def f(x,y):return {expr};f({_number(rng, 2)},{_number(rng, 2)})="


def _solve_code(prompt: str) -> str:
    expr, x, y = parse_prompt(_CODE, prompt)
    return lsd_first(_eval_terms(expr, {"x": int(x), "y": int(y)}))


# --------------------------------------------------------------------------- registry

FAMILIES: tuple[Family, ...] = (
    Family("add", _sample_add, _solve_arith),
    Family("sub", _sample_sub, _solve_arith),
    _sequence_family("copy", "copy", SEQ_LEN, lambda s: s),
    _sequence_family("reverse", "rev", SEQ_LEN, lambda s: s[::-1]),
    _sequence_family("sort", "sort", SORT_LEN, lambda s: "".join(sorted(s))),
    Family("count", _sample_count, _solve_count, ("count(", ")=")),
    Family("recall", _recall_sampler(_all_letters), _solve_recall, ("get(", ")=")),
    Family("code", _sample_code, _solve_code, ("def f(x,y):return ", ";f(", ")=")),
)
#: The evaluated families, in table order.
FAMILY_NAMES: tuple[str, ...] = tuple(family.name for family in FAMILIES)

#: Training-only variants of copy and recall whose payloads use 2–4 letters.
#:
#: Why: with 26 letters, AR copy finds its next letter by *induction* — look up the letter it
#: has just written in the source and emit the one after it — so the frozen context tower's keys
#: need not say where in the payload a letter sits.  The denoiser's first pass sees a block of
#: masks, has no written letter to look up, and must find "payload letter ``j``" by offset; on
#: the test split it copied offsets 0–2 (which its Mamba convolution still reaches) and failed
#: from offset 3 on.  Over a few letters, the previous letter no longer identifies the next one,
#: so stage 1 must learn lookup by offset, and the context tower's keys carry it.  The prompts
#: have the evaluated families' form and hash into splits the same way; only training draws them.
TRAINING_ONLY_FAMILIES: tuple[Family, ...] = (
    _sequence_family("copy-rep", "copy", SEQ_LEN, lambda s: s, _few_letters),
    Family("recall-rep", _recall_sampler(_few_letters), _solve_recall, ("get(", ")=")),
)
FAMILY_BY_NAME: dict[str, Family] = {
    f.name: f
    for f in (*FAMILIES, *TRAINING_ONLY_FAMILIES, *LONG_FAMILIES, *LONG_TRAINING_ONLY_FAMILIES)
}


def _training_mix(names: Sequence[str], suffix: str) -> tuple[str, ...]:
    """Each family twice, or once and once as its training-only ``name + suffix`` variant."""
    return tuple(
        variant
        for name in names
        for variant in ((name, name + suffix) if name + suffix in FAMILY_BY_NAME else (name, name))
    )


#: What training draws from, each entry equally often: every evaluated family has the same
#: share, and copy and recall give half of theirs to their ``-rep`` variants.
TRAINING_MIX: tuple[str, ...] = _training_mix(FAMILY_NAMES, "-rep")
#: How many times stage 2 (the denoiser) draws each training example of these families; the
#: others once.  Why: after stage 1, the denoiser keeps the AR accuracy of every family but
#: copy and recall, whose first pass must look letters up by offset with nothing written yet
#: (see :data:`TRAINING_ONLY_FAMILIES`); each of their examples is drawn twice as often, which
#: raises the two families' share of stage 2 from a quarter to two fifths.
DIFFUSION_REPEATS: dict[str, int] = {"copy": 2, "copy-rep": 2, "recall": 2, "recall-rep": 2}
#: The long set's training draw: every long family gives half of its share to its ``-ramp``
#: variant (see :data:`~vllm_twotower.data.long_tasks.LONG_TRAINING_ONLY_FAMILIES`).
LONG_TRAINING_MIX: tuple[str, ...] = _training_mix(LONG_FAMILY_NAMES, "-ramp")
#: Template words of all families, first occurrence order (stable token ids).
KEYWORDS: tuple[str, ...] = tuple(dict.fromkeys(k for f in FAMILIES for k in f.keywords))


@dataclass(frozen=True)
class Workload:
    """A task set that is trained, evaluated and benchmarked as one: short or long answers.

    Why a value rather than module constants: training, the quality suite and the throughput
    benchmark each need the evaluated families, the training draw and a generation budget that
    covers every answer, and they need them for whichever set they are asked for
    (``--workload``); passing one object keeps the three from disagreeing.
    """

    name: str
    #: Evaluated families, in table order (every split but ``train`` draws these).
    families: tuple[str, ...]
    #: The training split's draw (see :data:`TRAINING_MIX`).
    training_mix: tuple[str, ...]
    #: How many times stage 2 draws each training example of a family (default once).
    diffusion_repeats: dict[str, int]
    #: A generation budget that holds the longest answer and its ``<eos>``, in whole blocks of
    #: 16, so that a block is never cut short by the budget.
    max_new_tokens: int


SHORT_WORKLOAD = Workload("short", FAMILY_NAMES, TRAINING_MIX, DIFFUSION_REPEATS, 32)
LONG_WORKLOAD = Workload(
    "long", LONG_FAMILY_NAMES, LONG_TRAINING_MIX, {}, 16 * -(-(LONG_ANSWER_TOKENS[1] + 1) // 16)
)
WORKLOADS: dict[str, Workload] = {w.name: w for w in (SHORT_WORKLOAD, LONG_WORKLOAD)}


# --------------------------------------------------------------------------- splits


def split_of(prompt: str) -> str:
    """The split a prompt belongs to: a salted hash of the prompt text, independent of seeds."""
    digest = hashlib.blake2b(prompt.encode(), digest_size=8, key=_SPLIT_SALT).digest()
    u = int.from_bytes(digest, "big") / 2**64
    for name, fraction in SPLIT_FRACTIONS.items():
        if u < fraction:
            return name
        u -= fraction
    return SPLITS[-1]


def make_example(family: Family, prompt: str) -> Example:
    """An example whose answer is computed from the prompt by the family's solver."""
    return Example(family.name, prompt, family.solve(prompt))


def _sample_in_split(
    family: Family, split: str, rng: random.Random, seen: set[str] | None
) -> Example:
    """Rejection-sample one prompt of ``family`` that hashes into ``split`` (and is unseen)."""
    for _ in range(_MAX_ATTEMPTS):
        prompt = family.sample(rng)
        if split_of(prompt) == split and (seen is None or prompt not in seen):
            if seen is not None:
                seen.add(prompt)
            return make_example(family, prompt)
    raise RuntimeError(f"family {family.name!r} has no more unseen prompts in split {split!r}")


def iter_split(
    split: str,
    n: int,
    seed: int,
    *,
    families: Sequence[str] | None = None,
    unique: bool | None = None,
) -> Iterator[Example]:
    """Stream ``n`` examples of ``split``, deterministic in ``(split, n, seed, families)``.

    Families are balanced: each round of ``len(families)`` examples holds every family once, in
    a shuffled order (so any ``n ≥ len(families)`` contains all of them and streaming needs no
    final shuffle).  ``unique`` (default: all splits but ``train``) forbids repeated prompts, so
    evaluation sets count each question once; training repeats are harmless.
    """
    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    chosen = [FAMILY_BY_NAME[name] for name in (families or FAMILY_NAMES)]
    rng = random.Random(f"vllm-twotower:{seed}:{split}")
    seen: set[str] | None = set() if (split != "train" if unique is None else unique) else None
    order: list[Family] = []
    for _ in range(n):
        if not order:
            order = list(chosen)
            rng.shuffle(order)
        yield _sample_in_split(order.pop(), split, rng, seen)


def generate_split(
    split: str,
    n: int,
    seed: int,
    *,
    families: Sequence[str] | None = None,
    unique: bool | None = None,
) -> list[Example]:
    """The list form of :func:`iter_split`."""
    return list(iter_split(split, n, seed, families=families, unique=unique))


# --------------------------------------------------------------------------- checking


def normalize_generation(generated: str) -> str:
    """Cut generated text at the first EOS/pad marker and drop trailing whitespace.

    Servers usually strip special tokens already; this also accepts raw decodes.
    """
    for stop in (EOS_TOKEN, PAD_TOKEN):
        generated = generated.split(stop, 1)[0]
    return generated.rstrip()


def score(family: str, prompt: str, generated: str) -> bool:
    """Exact match of ``generated`` against the answer recomputed from ``prompt``."""
    return normalize_generation(generated) == FAMILY_BY_NAME[family].solve(prompt)


def is_correct(example: Example, generated: str) -> bool:
    """Exact match of ``generated`` against ``example.answer``."""
    return normalize_generation(generated) == example.answer


def accuracy_by_family(examples: Iterable[Example], generations: Iterable[str]) -> dict[str, float]:
    """Exact-match accuracy per family plus ``"all"``, over paired examples and generations."""
    hits: dict[str, list[bool]] = {}
    for example, generated in zip(examples, generations, strict=True):
        ok = is_correct(example, generated)
        hits.setdefault(example.family, []).append(ok)
        hits.setdefault("all", []).append(ok)
    return {name: sum(values) / len(values) for name, values in hits.items()}


# --------------------------------------------------------------------------- files


def write_jsonl(path: str | Path, examples: Iterable[Example]) -> int:
    """Write examples as one ``{"family", "prompt", "answer"}`` object a line; returns the count."""
    count = 0
    with Path(path).open("w") as f:
        for example in examples:
            f.write(json.dumps(example._asdict()) + "\n")
            count += 1
    return count


def read_jsonl(path: str | Path) -> list[Example]:
    """Examples written by :func:`write_jsonl`."""
    with Path(path).open() as f:
        return [Example(**json.loads(line)) for line in f if line.strip()]
