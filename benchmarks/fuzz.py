"""Fuzz a server for minutes: ``python benchmarks/fuzz.py --minutes 10 [--url URL] [--smoke]``.

Without ``--url`` it starts ``python -m vllm.entrypoints.openai.api_server`` on loopback with the
checkpoint (default: the embedded one, ``EMBEDDED_ENGINE_ARGS``) and stops it at the end.  It
prints a JSON report (hostile requests sent, statuses, good requests sent, failures) and exits
non-zero if any property of :mod:`tests.fuzz.hostile` failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests
from serve import free_port, server, server_flags

from vllm_twotower.checkpoints import DEFAULT_CHECKPOINT
from vllm_twotower.config import TwoTowerConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the fuzzer's strategies live with the tests that use them
from tests.fuzz.hostile import Fuzzer, GoodTraffic, Limits, good_bodies  # noqa: E402

#: The plugin's 400 for lone surrogates (vLLM's own front end answers them 500).
GUARD = "vllm_twotower.engine.text_guard.RefuseUnencodableText"


def server_command(checkpoint: Path, port: int) -> list[str]:
    """The API server on ``checkpoint`` with the embedded engine arguments as options."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
            str(checkpoint), "--host", "127.0.0.1", "--port", str(port),
            "--middleware", GUARD, *server_flags()]  # fmt: skip


@contextlib.contextmanager
def target(url: str | None, checkpoint: Path, log: Path) -> Iterator[str]:
    """``url``, or a server of our own on ``checkpoint`` for the duration of the block."""
    if url:
        yield url.rstrip("/")
        return
    port = free_port()
    with server(server_command(checkpoint, port), port, log, lambda: None):
        yield f"http://127.0.0.1:{port}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--url", help="fuzz this running server instead of starting one")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--examples", type=int, default=25, help="hostile batches per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="one short round (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.minutes, args.examples = 0.0, 3
    config = TwoTowerConfig.from_pretrained(args.checkpoint)
    log = Path(tempfile.mkdtemp()) / "server.log"
    failures: list[str] = []
    with target(args.url, args.checkpoint, log) as base:
        model = requests.get(f"{base}/v1/models", timeout=30).json()["data"][0]
        limits = Limits(config.vocab_size, config.diffusion.mask_token_id,
                        model["max_model_len"], config.max_block_size)  # fmt: skip
        good = GoodTraffic(base, good_bodies(model["id"], config.max_block_size))
        good.start()
        fuzzer = Fuzzer(base, model["id"], limits)
        deadline, round_ = time.monotonic() + 60 * args.minutes, 0
        try:
            while round_ == 0 or time.monotonic() < deadline:
                try:  # a failing round ends with hypothesis' shrunk example; go on to the next
                    fuzzer.run(args.examples, first_seed=args.seed + round_)
                except AssertionError as error:
                    failures.append(str(error).split("\n")[0][:1000])
                round_ += 1
        finally:
            good.stop()
        failures += good.mismatches
    report = fuzzer.report
    print(json.dumps({
        "hostile_requests": report.sent, "refused_4xx": report.refused,
        "statuses": dict(sorted(report.statuses.items())), "rounds": round_,
        "good_requests": good.sent, "failures": failures,
    }, indent=2))  # fmt: skip
    if failures and not args.url:
        print(log.read_text()[-6000:], file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
