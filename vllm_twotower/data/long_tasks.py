"""Long-answer task families: exactly checkable answers of 48–200 tokens (issue 21).

Why: the short families (:mod:`~vllm_twotower.data.tasks`) answer in 2–13 tokens, a third of a
16-token diffusion block, while users of a served model ask for hundreds of tokens, where every
block is full.  These families measure that regime.  Each is a deterministic function of its
prompt (the solver parses the prompt), so exact match needs no reference answer.  Some are
easy to parallelise — every answer token depends on the prompt alone — and some carry a
left-to-right dependency, where a token depends on tokens written before it:

=========== ==================================  ======================================  ===========
family      prompt                              answer                                  dependency
=========== ==================================  ======================================  ===========
long-copy   ``copy[aQWERbTYUI…]=``              ``aQWERbTYUI…``                         none
rot13       ``rot13[aQWERbTYUI…]=``             ``aDJREbGLHV…`` (each letter shifted)   none
long-sort   ``sort[QWERTY…]=``                  ``EQRTWY…``                             counts
long-add    ``add[a7431b…+a2865b…]=``           ``a9207b…`` (digit sums with carries)   carry
cumsum      ``cumsum[a3141b5926…]=``            ``a3489b4351…`` (running sums mod 10)   running sum
countdown   ``countdown[527,8]=``               ``915,115,305,…`` (527-8=519, 511, …)   trace
=========== ==================================  ======================================  ===========

**Labelled chunks.**  Copy, rot13, cumsum and both ``long-add`` operands are written in chunks
of :data:`CHUNK` = 4 items, each chunk preceded by a lower-case label (``a``, ``b``, … ``z``),
and the answer carries the same labels (:func:`labelled`).  Why: answer item *j* needs payload
item *j*, up to 130 tokens back.  In the first form of these families (plain payloads) that
lookup had to be found by its offset, and a 5-attention-layer model trained from the short
checkpoint did not learn it in 1 000 steps (rot13, long-add and cumsum at 0 % exact match,
``docs/quality.md``).  With labels it is found by content — the label just written (the next
letter of the alphabet after the previous one) selects the chunk, an offset of at most four
selects the item — which is the short families' copy skill, and the answer has a fixed period
of five tokens, so a denoiser can place labels and items in a block without decoding left to
right.  ``long-sort`` stays unlabelled: a sorted letter has no one source position.

Numbers are written least-significant digit first, as in the short ``add`` family and for the
same reason (:func:`~vllm_twotower.data.family.lsd_first`): then a digit depends on the digits
at its own position and the carry just written.  In ``long-add`` both operands have the same
number of digits and are written least-significant first too, so answer digit *i* sits under
operand digit *i* of each, in the chunk of the same label (their most significant digits are
non-zero, so the sum has as many digits as an operand, or one more: a final carry, in a chunk
of its own).  ``countdown[X,K]=`` is the trace of ``while x >= K: x -= K; print(x)`` from
``x = X``, each value three digits (zero-padded) least-significant first, comma-separated.

Lengths: 12–26 chunks (48–104 letters or digits, 60–130 answer tokens) for copy, rot13 and
cumsum, 12–24 chunks per ``long-add`` operand (62–122 answer tokens), 48–120 letters to sort,
13–40 countdown steps (51–159 tokens), so every answer is 48–200 tokens (a character is a
token) and their mean is 93.9 over 300 test prompts per family (``tests/test_long_tasks.py``
holds both bounds and a mean of at least 80).  ``countdown`` has 8 372 distinct prompts (steps
up to 24, values below 1000): 408 of them in the test split and 450 in validation, enough for
the quality suite's 100 per family, not for more than about 400.

Template words are plain characters (no tokenizer keyword is added: the shipped tokenizer, and
every short prompt's ids, stay as they are); chunk labels are single lower-case letters
between upper-case letters or digits, so no label run can form a short family's template
word (all of which are added tokens).  Training also draws a ``-ramp`` variant of each
family, the same prompts with shorter payloads (:data:`LONG_TRAINING_ONLY_FAMILIES`), for the
reason given there.
"""

from __future__ import annotations

import codecs
import random
import re
import string
from collections.abc import Callable
from itertools import accumulate

from vllm_twotower.data.family import (
    LETTERS,
    Family,
    lsd_first,
    parse_prompt,
    payload_family,
)

DIGITS = "0123456789"
#: Inclusive bounds of every evaluated long answer, in tokens (without ``<eos>``).
LONG_ANSWER_TOKENS = (48, 200)
#: Items (letters or digits) per labelled chunk, and the labels, in order: chunk *i* of a
#: payload is written ``LABELS[i]`` followed by its :data:`CHUNK` items.
CHUNK = 4
LABELS = string.ascii_lowercase
#: Chunks of a copy, rot13 or cumsum payload, and of each ``long-add`` operand (one label is
#: left over for the sum's final carry).
PAYLOAD_CHUNKS = (12, 26)
ADD_CHUNKS = (12, 24)
#: Letters of a ``long-sort`` payload.
SORT_LEN = (48, 120)
#: Values a ``countdown`` prints; its step ``K`` is drawn from :data:`COUNTDOWN_STEP`.
COUNTDOWN_STEPS = (13, 40)
COUNTDOWN_STEP = (2, 24)
#: The ``-ramp`` variants' bounds: the same tasks just below the evaluated lengths.
RAMP_CHUNKS = (2, 9)
RAMP_SORT_LEN = (8, 47)
RAMP_COUNTDOWN_STEPS = (3, 12)


def labelled(items: str) -> str:
    """``items`` in chunks of :data:`CHUNK`, each preceded by its label: ``aQWERbTY``."""
    if len(items) > CHUNK * len(LABELS):
        raise ValueError(f"{len(items)} items need more than {len(LABELS)} labels")
    return "".join(
        LABELS[i] + items[CHUNK * i : CHUNK * (i + 1)] for i in range(-(-len(items) // CHUNK))
    )


def unlabelled(text: str) -> str:
    """The items of a :func:`labelled` text; ValueError unless its labels are ``a, b, c, …``."""
    chunks = re.findall(r"[a-z][^a-z]*", text)
    if "".join(chunks) != text or [c[0] for c in chunks] != list(LABELS[: len(chunks)]):
        raise ValueError(f"{text!r} is not labelled a, b, c, …")
    if any(len(c) != CHUNK + 1 for c in chunks[:-1]) or not 1 < len(chunks[-1]) <= CHUNK + 1:
        raise ValueError(f"{text!r} is not chunked by {CHUNK}")
    return "".join(c[1:] for c in chunks)


def _labelled_family(
    name: str, keyword: str, alphabet: str, chunks: tuple[int, int], fn: Callable[[str], str]
) -> Family:
    """``keyword[aXXXXbXXXX…]=`` → ``labelled(fn(items))``: copy, rot13 and cumsum, in whole
    chunks only, so the answer keeps its five-token period (why labels: the module docstring).
    """
    pattern = re.compile(
        re.escape(keyword) + rf"\[((?:[a-z][{alphabet[0]}-{alphabet[-1]}]{{{CHUNK}}})+)\]="
    )

    def sample(rng: random.Random) -> str:
        items = "".join(rng.choice(alphabet) for _ in range(CHUNK * rng.randint(*chunks)))
        return f"{keyword}[{labelled(items)}]="

    def solve(prompt: str) -> str:
        return labelled(fn(unlabelled(parse_prompt(pattern, prompt)[0])))

    return Family(name, sample, solve)


def _sort_family(name: str, length: tuple[int, int]) -> Family:
    """``sort[QWERTY…]=`` → the letters in order (unlabelled: an item has no one source)."""
    head = "sort[{}]="
    return payload_family(name, head, length, lambda s: "".join(sorted(s)), lambda _: LETTERS)


def _rot13(text: str) -> str:
    return codecs.encode(text, "rot13")


def _running_sums(digits: str) -> str:
    """Digit ``i`` of the answer: the sum of payload digits ``0..i``, mod 10."""
    return "".join(str(total % 10) for total in accumulate(int(d) for d in digits))


# --------------------------------------------------------------------------- long addition

_LONG_ADD = re.compile(rf"add\[((?:[a-z]\d{{{CHUNK}}})+)\+((?:[a-z]\d{{{CHUNK}}})+)\]=")


def _add_sampler(chunks: tuple[int, int]) -> Callable[[random.Random], str]:
    """Two labelled operands of one random length, least-significant digit first, top digits
    non-zero."""

    def sample(rng: random.Random) -> str:
        n = CHUNK * rng.randint(*chunks)
        a, b = (
            labelled("".join(rng.choice(DIGITS) for _ in range(n - 1)) + rng.choice(DIGITS[1:]))
            for _ in range(2)
        )
        return f"add[{a}+{b}]="

    return sample


def _solve_long_add(prompt: str) -> str:
    a, b = (unlabelled(operand) for operand in parse_prompt(_LONG_ADD, prompt))
    if len(a) != len(b):
        raise ValueError(f"operands of {prompt!r} differ in length")
    return labelled(lsd_first(int(a[::-1]) + int(b[::-1])))


# --------------------------------------------------------------------------- countdown trace

_COUNTDOWN = re.compile(r"countdown\[(\d+),(\d+)\]=")


def _countdown_sampler(steps: tuple[int, int]) -> Callable[[random.Random], str]:
    """``countdown[X,K]=`` with ``X // K`` in ``steps`` (``X`` stays below 1000)."""

    def sample(rng: random.Random) -> str:
        step = rng.randint(*COUNTDOWN_STEP)
        start = step * rng.randint(*steps) + rng.randrange(step)
        return f"countdown[{start},{step}]="

    return sample


def _solve_countdown(prompt: str) -> str:
    start, step = (int(group) for group in parse_prompt(_COUNTDOWN, prompt))
    values = range(start - step, -1, -step)
    return ",".join(f"{value:03d}"[::-1] for value in values)


# --------------------------------------------------------------------------- registry


def _long_families(
    chunks: tuple[int, int],
    add: tuple[int, int],
    sort: tuple[int, int],
    steps: tuple[int, int],
    suffix: str,
) -> tuple[Family, ...]:
    """The six long families at the given lengths, each name followed by ``suffix``."""
    return (
        _labelled_family("long-copy" + suffix, "copy", LETTERS, chunks, lambda s: s),
        _labelled_family("rot13" + suffix, "rot13", LETTERS, chunks, _rot13),
        _sort_family("long-sort" + suffix, sort),
        Family("long-add" + suffix, _add_sampler(add), _solve_long_add),
        _labelled_family("cumsum" + suffix, "cumsum", DIGITS, chunks, _running_sums),
        Family("countdown" + suffix, _countdown_sampler(steps), _solve_countdown),
    )


#: The evaluated long families, in table order.
LONG_FAMILIES: tuple[Family, ...] = _long_families(
    PAYLOAD_CHUNKS, ADD_CHUNKS, SORT_LEN, COUNTDOWN_STEPS, ""
)
LONG_FAMILY_NAMES: tuple[str, ...] = tuple(family.name for family in LONG_FAMILIES)
#: Training-only ``-ramp`` variants: the same prompts with shorter payloads (2–9 chunks of
#: four, 8–47 letters to sort, 3–12 countdown steps).  Why: a long answer is learned as one
#: skill applied at every position — find payload item *i* (chunk label, offset) when writing
#: answer item *i* — and shorter sequences teach that lookup at a fraction of the cost of a
#: long one, while the evaluated lengths, drawn as often, teach it at the distances the test
#: split asks for.  Their answers are shorter than 48 tokens, so no ramp prompt can equal an
#: evaluated one.
LONG_TRAINING_ONLY_FAMILIES: tuple[Family, ...] = _long_families(
    RAMP_CHUNKS, RAMP_CHUNKS, RAMP_SORT_LEN, RAMP_COUNTDOWN_STEPS, "-ramp"
)
