"""Soak: N concurrent streaming clients, mixed modes and parameters, for a given time.

    python benchmarks/soak.py --concurrency 64 --minutes 15 --json soak.json
    python benchmarks/soak.py --smoke        # 4 clients for a few requests (CI)

It starts ``python -m vllm.entrypoints.openai.api_server`` on the embedded checkpoint (loopback,
``EMBEDDED_ENGINE_ARGS``, the ``twotower_stats`` endpoint on) unless ``--url`` names a running
one (then ``--pid`` names its API-server process, for the memory samples).  Each client loops:
one streamed ``/v1/completions`` request at a time, its mode and parameters cycling through
:data:`MIXES` (every mode, default and small custom blocks, greedy and seeded sampling, short
and ``ignore_eos`` long outputs), its prompt from the project's test split.

It reports completed requests, errors (non-200 statuses, error events inside streams,
connection failures), latency percentiles per mix, the resident memory of every process of the
server (API server, EngineCore) sampled over time, and, through ``/v1/twotower/stats`` at the
end, every request whose denoiser counters disagree with the tokens it returned
(:func:`vllm_twotower.engine.stats_rules.stats_mismatches`).  docs/reliability.md records runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests
from serve import free_port, server, server_flags

from vllm_twotower.checkpoints import DEFAULT_CHECKPOINT
from vllm_twotower.data import generate_split
from vllm_twotower.engine.requests import matches_request_id
from vllm_twotower.engine.stats_rules import stats_mismatches

#: ``(name, vllm_xargs, extra body)`` of the request mixes clients cycle through.
MIXES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("diffusion", {"mode": "mask_diffusion"}, {}),
    (
        "diffusion-b4",
        {
            "mode": "mask_diffusion",
            "block_size": 4,
            "steps_per_block": 2,
            "confidence_threshold": 0.5,
        },
        {"temperature": 0.8},
    ),
    ("diffusion-long", {"mode": "mask_diffusion", "block_size": 7}, {"ignore_eos": True}),
    ("ar", {"mode": "ar"}, {}),
    ("ar-long", {"mode": "ar"}, {"ignore_eos": True, "temperature": 0.8}),
    ("mock_ar", {"mode": "mock_ar"}, {"temperature": 0.8}),
    ("speculative", {"mode": "speculative"}, {"temperature": 0.8}),
    (
        "diffusion-filtered",
        {"mode": "mask_diffusion"},
        {"temperature": 0.8, "top_p": 0.9, "top_k": 8, "presence_penalty": 0.5},
    ),
]
STEPS_DEFAULT = 16  # the embedded checkpoint's generation_config


@dataclass
class Result:
    mix: str
    ok: bool
    latency_s: float
    tokens: int = 0
    response_id: str = ""
    error: str = ""


@dataclass
class Soak:
    base: str
    prompts: list[str]
    model: str
    max_tokens: int
    results: list[Result] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def client(self, index: int) -> None:
        n = index
        while not self.stop.is_set():
            mix, xargs, extra = MIXES[n % len(MIXES)]
            body = {
                "model": self.model,
                "prompt": self.prompts[n % len(self.prompts)],
                "max_tokens": self.max_tokens,
                "temperature": 0.0,
                "seed": n,
                "stream": True,
                "stream_options": {"include_usage": True},
                "vllm_xargs": xargs,
                **extra,
            }
            result = self.one(mix, body)
            with self.lock:
                self.results.append(result)
            n += len(MIXES) + 1  # the next mix, another prompt

    def one(self, mix: str, body: dict[str, Any]) -> Result:
        start = time.monotonic()
        try:
            with requests.post(
                f"{self.base}/v1/completions", json=body, stream=True, timeout=600
            ) as response:
                if response.status_code != 200:
                    return Result(
                        mix,
                        False,
                        time.monotonic() - start,
                        error=f"HTTP {response.status_code}: {response.text[:200]}",
                    )
                events = [
                    json.loads(line[6:])
                    for line in response.iter_lines()
                    if line.startswith(b"data: {")
                ]
        except requests.RequestException as error:
            return Result(mix, False, time.monotonic() - start, error=repr(error))
        latency = time.monotonic() - start
        errors = [e["error"] for e in events if "error" in e]
        if errors or not events:
            return Result(mix, False, latency, error=str(errors or "no events"))
        usage = events[-1].get("usage") or {}
        return Result(mix, True, latency, usage.get("completion_tokens", 0), events[0]["id"])


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def process_label(proc: psutil.Process) -> str:
    """``name:pid``; vLLM titles its engine and worker processes ``VLLM::...``."""
    with contextlib.suppress(psutil.Error):
        title = " ".join(proc.cmdline()) or proc.name()
        if "vllm.entrypoints.openai.api_server" in title:
            return f"api_server:{proc.pid}"
        return f"{proc.name()}:{proc.pid}"  # VLLM::EngineCore, VLLM::Worker (setproctitle)
    return f"gone:{proc.pid}"


def sample_rss(pid: int | None, every_s: float, stop: threading.Event, out: list[dict]) -> None:
    """Every ``every_s``: the resident MiB of each process of the server's tree."""
    start = time.monotonic()
    while pid is not None and not stop.is_set():
        row: dict[str, float] = {"t_s": round(time.monotonic() - start, 1)}
        with contextlib.suppress(psutil.Error):
            for proc in process_tree(pid):
                with contextlib.suppress(psutil.Error):
                    row[process_label(proc)] = round(proc.memory_info().rss / 2**20, 1)
        out.append(row)
        stop.wait(every_s)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    cuts = (
        statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    )
    return {
        "p50": round(cuts[49], 3),
        "p90": round(cuts[89], 3),
        "p99": round(cuts[98], 3),
        "max": round(max(values), 3),
    }


def check_stats(base: str, results: list[Result]) -> tuple[int, list[str]]:
    """Requests checked against their counters, and the mismatches (see the module doc)."""
    got = requests.get(f"{base}/v1/twotower/stats", timeout=120)
    if got.status_code != 200:
        return 0, [f"stats endpoint: HTTP {got.status_code}"]
    # Index the internal ids by every dash-separated prefix (a response id is one of them), so
    # that matching is not requests x entries.
    by_prefix: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    for internal_id, entry in got.json()["requests"].items():
        parts = internal_id.split("-")
        for i in range(1, len(parts) + 1):
            by_prefix["-".join(parts[:i])].append((internal_id, entry))
    by_mix = {name: (xargs, extra) for name, xargs, extra in MIXES}
    checked, problems = 0, []
    for result in results:
        if not result.ok:
            continue
        candidates = by_prefix.get(result.response_id, [])
        matched = [e for r, e in candidates if matches_request_id(r, result.response_id)]
        if len(matched) != 1:  # the oldest may have left the table (FINISHED_KEPT)
            continue
        xargs, _ = by_mix[result.mix]
        checked += 1
        problems += stats_mismatches(
            matched[0],
            tokens=result.tokens,
            block_size=xargs.get("block_size", 16),
            steps_per_block=xargs.get("steps_per_block", STEPS_DEFAULT),
        )
    return checked, problems


def summary(results: list[Result], duration_s: float) -> dict[str, Any]:
    per_mix: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        per_mix[r.mix].append(r)
    return {
        "duration_s": round(duration_s, 1),
        "completed": sum(r.ok for r in results),
        "errors": sum(not r.ok for r in results),
        "error_samples": [r.error for r in results if not r.ok][:5],
        "tokens": sum(r.tokens for r in results),
        "per_mix": {
            mix: {
                "completed": sum(r.ok for r in rs),
                "errors": sum(not r.ok for r in rs),
                "mean_tokens": round(statistics.fmean([r.tokens for r in rs if r.ok] or [0]), 1),
                "latency_s": percentiles([r.latency_s for r in rs if r.ok]),
            }
            for mix, rs in sorted(per_mix.items())
        },
    }


def rss_summary(samples: list[dict]) -> dict[str, dict[str, float]]:
    """Per process: first, max and last RSS, and the last third's growth (a plateau is ~0)."""
    labels = sorted({k for row in samples for k in row if k != "t_s"})
    out = {}
    for label in labels:
        series = [(row["t_s"], row[label]) for row in samples if label in row]
        third = series[len(series) * 2 // 3 :] or series
        out[label] = {
            "first_mib": series[0][1],
            "max_mib": max(v for _, v in series),
            "last_mib": series[-1][1],
            "last_third_growth_mib": round(third[-1][1] - third[0][1], 1),
        }
    return out


@contextlib.contextmanager
def target(args: argparse.Namespace, log: Path) -> Iterator[tuple[str, int | None]]:
    if args.url:
        yield args.url.rstrip("/"), args.pid
        return
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(args.checkpoint),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *server_flags(),
        "--max-num-seqs",
        str(max(args.concurrency, 8)),
    ]
    os.environ["VLLM_PLUGINS"] = "twotower,twotower_stats,twotower_guard"  # the server inherits it
    with server(cmd, port, log, lambda: None):
        pids = [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if f"--port {port}" in " ".join(p.info["cmdline"] or [])
        ]
        yield f"http://127.0.0.1:{port}", min(pids) if pids else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rss-every-s", type=float, default=10.0)
    parser.add_argument("--url", help="soak this running server instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the API server's pid (RSS samples)")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--json", type=Path, help="also write the full report here")
    parser.add_argument("--smoke", action="store_true", help="4 clients for 20 s (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.concurrency, args.minutes, args.rss_every_s, args.max_tokens = 4, 1 / 3, 2.0, 16
    prompts = [e.prompt for e in generate_split("test", 256, seed=0)]
    log = Path(tempfile.mkdtemp()) / "server.log"
    with target(args, log) as (base, pid):
        model = requests.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        soak = Soak(base, prompts, model, args.max_tokens)
        rss: list[dict] = []
        sampler = threading.Thread(target=sample_rss, args=(pid, args.rss_every_s, soak.stop, rss))
        sampler.start()
        clients = [threading.Thread(target=soak.client, args=(i,)) for i in range(args.concurrency)]
        start = time.monotonic()
        for c in clients:
            c.start()
        soak.stop.wait(60 * args.minutes)
        soak.stop.set()
        for c in clients:
            c.join()
        duration = time.monotonic() - start
        sampler.join()
        checked, problems = check_stats(base, soak.results)
        healthy = requests.get(f"{base}/health", timeout=30).status_code == 200
    report = {
        "concurrency": args.concurrency,
        **summary(soak.results, duration),
        "healthy_after": healthy,
        "stats_checked": checked,
        "stats_mismatches": len(problems),
        "stats_mismatch_samples": problems[:5],
        "rss": rss_summary(rss) if rss else {},
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps({**report, "rss_samples": rss}, indent=2))
    return 0 if report["errors"] == 0 and healthy and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
