"""Hostile requests against a live OpenAI server, sent while good requests run.

What a hostile client can send, drawn with hypothesis: every ``/v1/completions`` field at its
boundaries and at random (numbers at and past every bound, NaN / Infinity, wrong types, huge
integers), ``vllm_xargs`` with the plugin's keys and near misses, token-id prompts with
out-of-vocabulary, negative and mask ids, empty and over-long prompts, unicode and lone
surrogates, streaming, the chat endpoint, and bodies that are not JSON at all.

The properties (:class:`Fuzzer`):

* no hostile request gets a 5xx, in the HTTP status or inside a stream's events;
* the server stays alive (``/health``) and keeps answering;
* every good request sent meanwhile returns exactly what it returns on an idle server.

``tests/engine/test_server.py`` runs a bounded version in the default suite; ``python -m
tests.fuzz --minutes 10`` runs a long one against a server of its own (docs/reliability.md).
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

#: Requests without an answer within this many seconds count as failures (a hung server).
TIMEOUT_S = 300

_HUGE_INTS = [2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -(2**63), -(2**63) - 1]
_ODD_FLOATS = [float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324, -0.0, 1e30]
_ODD_VALUES = [None, True, False, "", "16", "ar", [], [1], {}, {"a": 1}, "\u202e\U0001f600"]


def _numbers(*bounds: float) -> st.SearchStrategy[Any]:
    """Values at, just inside and just outside ``bounds``, odd ones, and random numbers."""
    near = [b + d for b in bounds for d in (-1, -1e-9, 0, 1e-9, 1)]
    return st.one_of(
        st.sampled_from(near + _HUGE_INTS + _ODD_FLOATS + _ODD_VALUES),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
    )


def _texts() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40),
        st.sampled_from(["", " ", "\x00", "\ud800", "\U0010ffff" * 8, "copy(ABC)=", "a" * 3000]),
    )


@dataclass(frozen=True)
class Limits:
    """What the fuzzed server's model accepts (so boundaries sit where they matter)."""

    vocab_size: int
    mask_token_id: int
    max_model_len: int
    max_block_size: int


def _token_prompts(limits: Limits) -> st.SearchStrategy[Any]:
    v, mask, n = limits.vocab_size, limits.mask_token_id, limits.max_model_len
    ids = st.one_of(
        st.integers(min_value=0, max_value=v - 1),
        st.sampled_from([v, v + 1, -1, -(2**63), 2**63, 2**64, 10**12, mask, 0, 1, 2]),
    )
    return st.one_of(
        st.lists(ids, min_size=0, max_size=12),
        st.sampled_from([[], [mask] * 20, [1] * (n - 1), [1] * n, [1] * (n + 1), [1] * 5000]),
        st.lists(st.lists(ids, max_size=4), max_size=3),  # a batch of token prompts
        st.lists(_texts(), max_size=3),  # a batch of text prompts
        _texts(),
    )


def _xargs(limits: Limits) -> st.SearchStrategy[Any]:
    keys = st.one_of(
        st.sampled_from(
            [
                "mode",
                "confidence_threshold",
                "steps_per_block",
                "block_size",
                "twotower_mode",
                "steps_per_blocks",
                "blockSize",
                "kv_transfer_params",
                "other",
                "",
            ]
        ),
        st.text(max_size=12),
    )
    values = st.one_of(
        st.sampled_from(["ar", "mock_ar", "mask_diffusion", "AR", "beam"]),
        _numbers(0, 1, limits.max_block_size, 4 * limits.max_block_size),
        st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
    )
    return st.one_of(st.dictionaries(keys, values, max_size=5), st.sampled_from(_ODD_VALUES))


def _fields(limits: Limits) -> dict[str, st.SearchStrategy[Any]]:
    """A strategy per request field (OpenAI's and vLLM's extensions)."""
    n = limits.max_model_len
    ints = _numbers(0, 1, n)
    probability = _numbers(0, 1)
    return {
        "prompt": _token_prompts(limits),
        "max_tokens": _numbers(0, 1, n, n + 1),
        "temperature": _numbers(0, 1e-5, 2),
        "top_p": probability,
        "top_k": _numbers(-1, 0, limits.vocab_size),
        "min_p": probability,
        "presence_penalty": _numbers(-2, 2),
        "frequency_penalty": _numbers(-2, 2),
        "repetition_penalty": _numbers(0, 2),
        "n": _numbers(0, 1, 2, 64),
        "seed": _numbers(-1, 0, 2**63 - 1),
        "stop": st.one_of(_texts(), st.lists(_texts(), max_size=4), st.sampled_from(_ODD_VALUES)),
        "stop_token_ids": st.lists(_numbers(0, limits.vocab_size), max_size=3),
        "logit_bias": st.dictionaries(
            st.sampled_from(["-1", "0", "5", "127", "128", "x", ""]),
            _numbers(-100, 100),
            max_size=3,
        ),
        "logprobs": ints,
        "prompt_logprobs": ints,
        "echo": st.sampled_from([True, False, None, 1, "yes"]),
        "min_tokens": ints,
        "ignore_eos": st.sampled_from([True, False, None, 0]),
        "truncate_prompt_tokens": ints,
        "allowed_token_ids": st.lists(_numbers(0, limits.vocab_size), max_size=3),
        "bad_words": st.lists(_texts(), max_size=2),
        "suffix": _texts(),
        "user": _texts(),
        "best_of": _numbers(0, 1, 2),
        "use_beam_search": st.sampled_from([True, False]),
        "priority": _numbers(0, 1),
        "request_id": st.sampled_from(["same-id", "", "x" * 500, "\ud800"]),
        "cache_salt": _texts(),
        "stream_interval": ints,
        "response_format": st.sampled_from([{"type": "json_object"}, {"type": "bogus"}, "x"]),
        "kv_transfer_params": st.sampled_from([{}, {"do_remote_prefill": True}, "x"]),
        "vllm_xargs": _xargs(limits),
        "model": st.one_of(_texts(), st.sampled_from([None, 5])),
        "unknown_field": _numbers(0),
    }


@dataclass(frozen=True)
class Hostile:
    """One hostile request: a path and a body (a dict, or raw text that may not be JSON)."""

    path: str
    body: dict[str, Any] | str
    stream: bool = False


def hostile_requests(limits: Limits, model: str) -> st.SearchStrategy[Hostile]:
    """A valid request with one to four fields replaced by hostile values, or raw garbage."""
    fields = _fields(limits)

    @st.composite
    def completion(draw: st.DrawFn) -> Hostile:
        body: dict[str, Any] = {"model": model, "prompt": [1, 17, 29], "max_tokens": 8}
        for name in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=4)):
            body[name] = draw(fields[name])
        stream = draw(st.booleans())
        if stream:
            body["stream"] = True
            body["stream_options"] = draw(st.sampled_from([None, {"include_usage": True}]))
        return Hostile("/v1/completions", body, stream)

    chat = st.builds(
        lambda content, xargs: Hostile(
            "/v1/chat/completions",
            {
                "model": model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 8,
                "vllm_xargs": xargs,
            },
        ),
        _texts(),
        _xargs(limits),
    )
    garbage = st.sampled_from(["", "{", "null", "[]", '{"prompt": NaN}', "\x00\xff", "{" * 5000])
    raw = st.builds(lambda text: Hostile("/v1/completions", text), garbage)
    return st.one_of(completion(), completion(), completion(), chat, raw)


def send(base: str, request: Hostile) -> int:
    """Send one hostile request; return the worst status seen (HTTP, or inside a stream)."""
    data = request.body if isinstance(request.body, str) else json.dumps(request.body)
    headers = {"Content-Type": "application/json"}
    with requests.post(
        f"{base}{request.path}",
        data=data.encode("utf-8", "surrogatepass"),
        headers=headers,
        timeout=TIMEOUT_S,
        stream=request.stream,
    ) as response:
        status = response.status_code
        if request.stream and status == 200:
            for line in response.iter_lines():
                if line.startswith(b"data: {"):
                    error = json.loads(line[6:]).get("error")
                    if error:  # vLLM reports errors after the headers as stream events
                        status = max(status, int(error.get("code") or 500))
        return status


@dataclass
class GoodTraffic:
    """Good requests sent in a loop from threads, each compared to its idle-server answer."""

    base: str
    bodies: list[dict[str, Any]]
    expected: list[list[int]] = field(default_factory=list)
    sent: int = 0
    mismatches: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, body: dict[str, Any]) -> list[int]:
        response = requests.post(f"{self.base}/v1/completions", json=body, timeout=TIMEOUT_S)
        if response.status_code != 200:
            raise AssertionError(f"good request failed: {response.status_code} {response.text}")
        return response.json()["choices"][0]["token_ids"]

    def start(self) -> None:
        """Record the idle answers, then send the bodies in a loop (one thread each)."""
        self.expected = [self.answer(b) for b in self.bodies]
        for i in range(len(self.bodies)):
            thread = threading.Thread(target=self._loop, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _loop(self, i: int) -> None:
        while not self._stop.is_set():
            try:
                got = self.answer(self.bodies[i])
            except Exception as error:  # a failure is a finding, not a crash of the fuzzer
                got, note = None, repr(error)
            else:
                note = f"{got} != idle {self.expected[i]}"
            with self._lock:
                self.sent += 1
                if got != self.expected[i]:
                    self.mismatches.append(f"{self.bodies[i]['vllm_xargs']}: {note}")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=TIMEOUT_S)


def good_bodies(model: str, max_block_size: int) -> list[dict[str, Any]]:
    """Good requests of every mode, greedy and seeded, including a small custom block."""
    small = max(1, max_block_size // 4)
    xargs = [{"mode": "mask_diffusion"}, {"mode": "ar"}, {"mode": "mock_ar"},
             {"mode": "mask_diffusion", "block_size": small, "steps_per_block": 2}]  # fmt: skip
    return [
        {"model": model, "prompt": [1, 17 + i, 29, 33, 8], "max_tokens": 24,
         "temperature": 0.8 if i % 2 else 0.0, "seed": i, "vllm_xargs": x,
         "return_token_ids": True}
        for i, x in enumerate(xargs)
    ]  # fmt: skip


@dataclass
class Report:
    """What one fuzzing run did and found."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def refused(self) -> int:
        return sum(n for status, n in self.statuses.items() if 400 <= status < 500)


class Fuzzer:
    """Hostile batches against ``base`` with hypothesis, checking every property each batch."""

    def __init__(self, base: str, model: str, limits: Limits, batch: int = 6) -> None:
        self.base, self.model, self.limits, self.batch = base, model, limits, batch
        self.report = Report()

    def _round(self, examples: int, seed: int) -> None:
        strategy = st.lists(hostile_requests(self.limits, self.model), min_size=1,
                            max_size=self.batch)  # fmt: skip

        @hypothesis_seed(seed)
        @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck), print_blob=True)  # fmt: skip
        @given(batch=strategy)
        def check(batch: list[Hostile]) -> None:
            threads = [_Sender(self.base, r) for r in batch]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for t in threads:
                self.report.sent += 1
                self.report.statuses[t.status] += 1
                assert t.status < 500, f"{t.status} for {t.request!r}: {t.error}"
            health = requests.get(f"{self.base}/health", timeout=TIMEOUT_S)
            assert health.status_code == 200, f"server unhealthy after {batch!r}"

        check()

    def run(self, examples: int, rounds: int = 1, first_seed: int = 0) -> Report:
        """``rounds`` of ``examples`` hostile batches (each round its own hypothesis seed)."""
        for r in range(rounds):
            self._round(examples, first_seed + r)
        return self.report


class _Sender(threading.Thread):
    def __init__(self, base: str, request: Hostile) -> None:
        super().__init__(daemon=True)
        self.base, self.request = base, request
        self.status, self.error = 0, ""

    def run(self) -> None:
        try:
            self.status = send(self.base, self.request)
        except requests.RequestException as error:  # no answer: a hung or dead server
            self.status, self.error = 599, repr(error)
