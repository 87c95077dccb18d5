"""Faults while serving (slow suite): a killed engine process, client disconnects, and KV-cache
pressure with 64 concurrent requests through the server.

* The worker or the EngineCore process killed mid-generation: the streaming client gets an
  error or a closed stream instead of hanging, the API server reports the dead engine and
  exits (vLLM's watchdog), and the same command, restarted as a supervisor would, serves
  outputs equal to the reference again.
* A client that disconnects mid-stream has its request aborted: the engine frees its cache and
  keeps serving.
* 64 concurrent requests through a server with a tiny KV cache, prefix caching on and off:
  vLLM preempts and recomputes, and every output equals the reference (an unpressured run).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from tests.engine.test_parity import Case, prompt_ids, reference_outputs
from tests.engine.test_server import (
    ENGINE_FLAGS,
    assert_concurrent_outputs_exact,
    free_port,
    running_server,
)
from vllm_twotower.reference import TwoTowerModel

pytestmark = pytest.mark.slow

#: How long a client waits for any answer before calling the server hung (not a timing
#: assertion: a healthy server answers these in seconds).
HUNG_S = 300


def server_cmd(checkpoint: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
            str(checkpoint), "--host", "127.0.0.1", "--port", str(port), *ENGINE_FLAGS,
            *extra]  # fmt: skip


def engine_process(api_server_port: str, title: str) -> psutil.Process:
    """The process titled ``VLLM::<title>`` under the API server on ``api_server_port``."""
    for proc in psutil.process_iter(["cmdline"]):
        if f"--port {api_server_port}" in " ".join(proc.info["cmdline"] or []):
            for child in proc.children(recursive=True):
                if f"VLLM::{title}" in " ".join(child.cmdline()):
                    return child
    raise AssertionError(f"no VLLM::{title} process found")


def body(model: str, prompt: list[int], xargs: dict, max_tokens: int, **extra: object) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "vllm_xargs": xargs, "return_token_ids": True, **extra}  # fmt: skip


def model_id(base: str) -> str:
    return requests.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + HUNG_S
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(1)


def metric(base: str, name: str) -> float:
    text = requests.get(f"{base}/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}\{{.*\}} (\S+)$", text, re.M))


@pytest.mark.parametrize("victim", ["Worker", "EngineCore"])
def test_engine_process_killed_mid_generation(
    tiny_checkpoint: Path, tmp_path: Path, victim: str
) -> None:
    """vLLM 0.32 on CPU runs the model in a ``VLLM::Worker`` process under the
    ``VLLM::EngineCore`` (scheduler) process; either may die."""
    port = str(free_port())
    cmd = server_cmd(tiny_checkpoint, int(port))
    prompt = prompt_ids(20, 1)
    log = tmp_path / "server.log"
    with running_server(cmd, log, dict(os.environ)) as base:
        model = model_id(base)
        stream = requests.post(
            f"{base}/v1/completions",
            json=body(model, prompt, {"mode": "ar"}, 900, ignore_eos=True, stream=True),
            stream=True,
            timeout=HUNG_S,
        )
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith(b"data: "))
        assert b"choices" in first  # it is generating
        engine_process(port, victim).kill()
        # The client is told, by an error event or a cut connection, rather than left waiting.
        try:
            rest = [line[6:] for line in lines if line.startswith(b"data: {")]
        except requests.RequestException:
            pass  # the connection was cut
        else:
            assert any("error" in json.loads(event) for event in rest), rest[-3:]
        # New requests are answered with an error (or find the server gone), not left hanging.
        try:
            late = requests.post(
                f"{base}/v1/completions", json=body(model, prompt, {}, 8), timeout=HUNG_S
            )
        except requests.ConnectionError:
            pass
        else:
            assert late.status_code >= 500, late.text
        # vLLM's watchdog stops the API server once its engine is dead.
        wait_until(lambda: not any(f"--port {port}" in " ".join(p.info["cmdline"] or [])
                                   for p in psutil.process_iter(["cmdline"])),
                   "the API server exited")  # fmt: skip
    text = log.read_text()
    assert re.search(r"EngineCore|engine core", text, re.I) and re.search(
        r"died|dead|unexpectedly|EngineDeadError", text
    ), text[-3000:]
    # A supervisor restarts the same command; it serves exact outputs again.
    with running_server(cmd, tmp_path / "restarted.log", dict(os.environ)) as base:
        response = requests.post(f"{base}/v1/completions",
                                 json=body(model_id(base), prompt, {"mode": "mask_diffusion"}, 20),
                                 timeout=HUNG_S)  # fmt: skip
        assert response.status_code == 200, response.text
    (expected,) = reference_outputs(
        TwoTowerModel.from_pretrained(tiny_checkpoint), [prompt], [Case(20, {}, max_tokens=20)]
    )
    assert response.json()["choices"][0]["token_ids"] == expected


@pytest.fixture(scope="module", params=["prefix-caching", "no-prefix-caching"])
def pressured_server(
    request: pytest.FixtureRequest, tiny_checkpoint: Path, tmp_path_factory
) -> Iterator[str]:
    flag = "--enable-prefix-caching" if request.param == "prefix-caching" else (
        "--no-enable-prefix-caching")  # fmt: skip
    port = free_port()
    cmd = server_cmd(tiny_checkpoint, port, "--num-gpu-blocks-override", "8",
                     "--max-num-seqs", "64", flag)  # fmt: skip
    # ENGINE_FLAGS' max_model_len must fit in the 8 blocks' ~750 tokens
    cmd[cmd.index("--max-model-len") + 1] = "512"
    log = tmp_path_factory.mktemp("pressure") / "server.log"
    with running_server(cmd, log, dict(os.environ)) as base:
        yield base


def test_client_disconnect_frees_the_request(pressured_server: str) -> None:
    base = pressured_server
    model = model_id(base)
    stream = requests.post(
        f"{base}/v1/completions",
        json=body(model, prompt_ids(90, 7), {}, 400, ignore_eos=True, stream=True),
        stream=True,
        timeout=HUNG_S,
    )
    next(line for line in stream.iter_lines() if line.startswith(b"data: "))
    stream.close()  # the client goes away mid-generation
    wait_until(lambda: metric(base, "vllm:num_requests_running") == 0, "the request was aborted")
    wait_until(lambda: metric(base, "vllm:kv_cache_usage_perc") == 0, "its cache was freed")
    after = requests.post(f"{base}/v1/completions", json=body(model, [1, 5, 9], {}, 8),
                          timeout=HUNG_S)  # fmt: skip
    assert after.status_code == 200 and len(after.json()["choices"][0]["token_ids"]) == 8


def test_64_concurrent_requests_under_preemption_are_exact(
    pressured_server: str, tiny_checkpoint: Path
) -> None:
    base = pressured_server
    modes = [{"mode": "mask_diffusion"}, {"mode": "ar"}, {"mode": "mock_ar"},
             {"mode": "mask_diffusion", "block_size": 4, "steps_per_block": 2}]  # fmt: skip
    # Shared prefixes, so prefix caching has something to share.
    base_prompt = prompt_ids(120, 64)
    prompts = [[*base_prompt[: 60 + i], *prompt_ids(10, i)[1:]] for i in range(64)]
    cases = [Case(len(p), modes[i % 4], max_tokens=48) for i, p in enumerate(prompts)]
    before = metric(base, "vllm:num_preemptions_total")
    model = TwoTowerModel.from_pretrained(tiny_checkpoint)
    assert_concurrent_outputs_exact(base, model, prompts, cases)
    assert metric(base, "vllm:num_preemptions_total") > before, "no preemption happened"
