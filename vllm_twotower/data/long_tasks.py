"""Long-answer task families: exactly checkable answers of 48–200 tokens (issue 21).

Why: the short families (:mod:`~vllm_twotower.data.tasks`) answer in 2–13 tokens, a third of a
16-token diffusion block, while users of a served model ask for hundreds of tokens, where every
block is full.  These families measure that regime.  Each is a deterministic function of its
prompt (the solver parses the prompt), so exact match needs no reference answer.  Some are
easy to parallelise — every answer token depends on the prompt alone — and some carry a
left-to-right dependency, where a token depends on tokens written before it:

==========  =============================  ======================================  ============
family      prompt                         answer                                  dependency
==========  =============================  ======================================  ============
long-copy   ``copy[QWERTY…]=``             ``QWERTY…``                             none
rot13       ``rot13[QWERTY…]=``            ``DJREGL…`` (each letter shifted 13)    none
long-sort   ``sort[QWERTY…]=``             ``EQRTWY…``                             counts
long-add    ``add[7431…+2865…]=``          ``9207…`` (digit sums with carries)     carry
cumsum      ``cumsum[3141…]=``             ``3489…`` (running sums mod 10)         running sum
countdown   ``countdown[527,8]=``          ``915,115,305,…`` (527-8=519, 511, …)   trace
==========  =============================  ======================================  ============

Numbers are written least-significant digit first, as in the short ``add`` family and for the
same reason (:func:`~vllm_twotower.data.family.lsd_first`): then a digit depends on the digits
at its own position and the carry just written.  In ``long-add`` both operands have the same
number of digits and are written least-significant first too, so answer digit *i* sits under
operand digit *i* of each (their most significant digits are non-zero, so the sum has as many
digits as an operand, or one more).  ``countdown[X,K]=`` is the trace of
``while x >= K: x -= K; print(x)`` from ``x = X``, each value three digits (zero-padded)
least-significant first, comma-separated.

Lengths: payloads of 48–120 letters or digits, 48–96 digits per ``long-add`` operand, 13–40
countdown steps (51–159 tokens), so every answer is 48–200 tokens (a character is a token)
and their mean is 85.2 over 300 test prompts per family (``tests/test_long_tasks.py`` holds
both bounds and a mean of at least 80).  ``countdown`` has 8 372 distinct prompts (steps up to
24, values below 1000): 408 of them in the test split and 450 in validation, enough for the
quality suite's 100 per family, not for more than about 400.

Template words are plain characters (no tokenizer keyword is added: the shipped tokenizer, and
every short prompt's ids, stay as they are) and hold lower-case letters, which payloads never
do.  Training also draws a ``-ramp`` variant of each family, the same prompts with shorter
payloads (:data:`LONG_TRAINING_ONLY_FAMILIES`), for the reason given there.
"""

from __future__ import annotations

import codecs
import random
import re
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
#: Letters or digits of a copy, rot13, sort or cumsum payload.
PAYLOAD_LEN = (48, 120)
#: Digits of each ``long-add`` operand.
ADD_DIGITS = (48, 96)
#: Values a ``countdown`` prints; its step ``K`` is drawn from :data:`COUNTDOWN_STEP`.
COUNTDOWN_STEPS = (13, 40)
COUNTDOWN_STEP = (2, 24)
#: The ``-ramp`` variants' bounds: the same tasks just below the evaluated lengths.
RAMP_PAYLOAD_LEN = (8, 47)
RAMP_ADD_DIGITS = (8, 47)
RAMP_COUNTDOWN_STEPS = (3, 12)


def _payload_family(
    name: str, keyword: str, alphabet: str, length: tuple[int, int], fn: Callable[[str], str]
) -> Family:
    """``keyword[PAYLOAD]=`` → ``fn(PAYLOAD)``: copy, rot13, sort and cumsum differ in ``fn``."""
    chars = f"{alphabet[0]}-{alphabet[-1]}"
    return payload_family(name, f"{keyword}[{{}}]=", length, fn, lambda _: alphabet, chars=chars)


def _rot13(text: str) -> str:
    return codecs.encode(text, "rot13")


def _running_sums(digits: str) -> str:
    """Digit ``i`` of the answer: the sum of payload digits ``0..i``, mod 10."""
    return "".join(str(total % 10) for total in accumulate(int(d) for d in digits))


# --------------------------------------------------------------------------- long addition

_LONG_ADD = re.compile(r"add\[(\d+)\+(\d+)\]=")


def _add_sampler(digits: tuple[int, int]) -> Callable[[random.Random], str]:
    """Two operands of one random length, least-significant digit first, top digits non-zero."""

    def sample(rng: random.Random) -> str:
        n = rng.randint(*digits)
        a, b = (
            "".join(rng.choice(DIGITS) for _ in range(n - 1)) + rng.choice(DIGITS[1:])
            for _ in range(2)
        )
        return f"add[{a}+{b}]="

    return sample


def _solve_long_add(prompt: str) -> str:
    a, b = parse_prompt(_LONG_ADD, prompt)
    return lsd_first(int(a[::-1]) + int(b[::-1]))


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
    payload: tuple[int, int], add: tuple[int, int], steps: tuple[int, int], suffix: str
) -> tuple[Family, ...]:
    """The six long families at the given lengths, each name followed by ``suffix``."""
    return (
        _payload_family("long-copy" + suffix, "copy", LETTERS, payload, lambda s: s),
        _payload_family("rot13" + suffix, "rot13", LETTERS, payload, _rot13),
        _payload_family(
            "long-sort" + suffix, "sort", LETTERS, payload, lambda s: "".join(sorted(s))
        ),
        Family("long-add" + suffix, _add_sampler(add), _solve_long_add),
        _payload_family("cumsum" + suffix, "cumsum", DIGITS, payload, _running_sums),
        Family("countdown" + suffix, _countdown_sampler(steps), _solve_countdown),
    )


#: The evaluated long families, in table order.
LONG_FAMILIES: tuple[Family, ...] = _long_families(PAYLOAD_LEN, ADD_DIGITS, COUNTDOWN_STEPS, "")
LONG_FAMILY_NAMES: tuple[str, ...] = tuple(family.name for family in LONG_FAMILIES)
#: Training-only ``-ramp`` variants: the same prompts with shorter payloads (8–47 letters or
#: digits, 3–12 countdown steps).  Why: a long answer is learned as one skill applied at every
#: position — find payload position *i* (or operand digit *i*) when writing answer token *i* —
#: and shorter sequences teach that lookup at a fraction of the cost of a long one, while the
#: evaluated lengths, drawn as often, teach it at the distances the test split asks for.  Their
#: answers are shorter than 48 tokens, so no ramp prompt can equal an evaluated one.
LONG_TRAINING_ONLY_FAMILIES: tuple[Family, ...] = _long_families(
    RAMP_PAYLOAD_LEN, RAMP_ADD_DIGITS, RAMP_COUNTDOWN_STEPS, "-ramp"
)
