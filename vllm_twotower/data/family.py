"""What every task family is built from: :class:`Example`, :class:`Family` and the shared helpers.

Why a module of its own: the short families (:mod:`~vllm_twotower.data.tasks`) and the long
ones (:mod:`~vllm_twotower.data.long_tasks`) are drawn, split and scored by one mechanism, and
``tasks`` looks families of both sets up by name; both import their building blocks from here,
so neither imports the other's internals and nothing is defined twice.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

LETTERS = string.ascii_uppercase


class Example(NamedTuple):
    """One task instance; the model is trained on ``prompt + answer`` followed by EOS."""

    family: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """The training text without special tokens."""
        return self.prompt + self.answer


@dataclass(frozen=True)
class Family:
    """A task family: how to draw a prompt, how to answer it, and its fixed template words."""

    name: str
    sample: Callable[[random.Random], str]
    solve: Callable[[str], str]
    keywords: tuple[str, ...] = ()


def random_letters(rng: random.Random, length: tuple[int, int], alphabet: str = LETTERS) -> str:
    """A random string whose length is uniform in the inclusive range ``length``."""
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(*length)))


def parse_prompt(pattern: re.Pattern[str], prompt: str) -> tuple[str, ...]:
    """The groups of a full match of ``pattern`` against ``prompt``; ValueError if none."""
    match = pattern.fullmatch(prompt)
    if match is None:
        raise ValueError(f"prompt {prompt!r} does not match {pattern.pattern!r}")
    return match.groups()


def lsd_first(value: int) -> str:
    """``value`` with its digits least-significant first and its sign, if any, in front."""
    sign = "-" if value < 0 else ""
    return sign + str(abs(value))[::-1]


def payload_family(
    name: str,
    template: str,
    length: tuple[int, int],
    fn: Callable[[str], str],
    alphabet: Callable[[random.Random], str],
    *,
    chars: str = "A-Z",
    keywords: tuple[str, ...] = (),
) -> Family:
    """A family ``template`` (``{}`` = a payload over ``alphabet(rng)``) → ``fn(payload)``.

    Copy, reverse, sort and their long forms differ only in ``fn``, the template and the
    payload's length; ``chars`` is the regex class the solver accepts as a payload.
    """
    head, tail = template.split("{}")
    pattern = re.compile(re.escape(head) + f"([{chars}]+)" + re.escape(tail))

    def sample(rng: random.Random) -> str:
        return f"{head}{random_letters(rng, length, alphabet(rng))}{tail}"

    def solve(prompt: str) -> str:
        return fn(parse_prompt(pattern, prompt)[0])

    return Family(name, sample, solve, keywords)
