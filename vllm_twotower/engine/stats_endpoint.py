"""The worker's TwoTower stats over HTTP: a ``vllm.endpoint_plugins`` plugin for the API server.

The counters live in the workers (:class:`~vllm_twotower.engine.requests.RequestTable`, read by
the workers' ``twotower_stats`` method, which the ``twotower`` general plugin installs).  vLLM's
endpoint-plugin contract is to reach them from the API server only through
``engine_client.collective_rpc``, and this plugin adds:

* ``GET /v1/twotower/stats[?request_id=<response id>]``: totals and per-request counters,
  fetched afresh on every call;
* counters and gauges in what vLLM's ``/metrics`` serves, read from the latest snapshot.  The
  worker's totals are cumulative, so a custom collector reports them as they are instead of
  mirroring them into ``prometheus_client`` counters.  The snapshot is refreshed every
  :data:`INTERVAL_ENV` seconds by a background task and by every stats call, so a scrape right
  after a stats call reports the totals that call returned.
* with several API server processes (``--api-server-count``), vLLM sets
  ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` merges the metric files the processes write,
  so a collector in one process is never asked.  Each process then writes the snapshot to its
  file instead (:class:`MultiprocessGauges`).

vLLM loads endpoint plugins only when they are named in ``VLLM_PLUGINS``, which is also the
allowlist of general plugins: serve with ``VLLM_PLUGINS=twotower,twotower_stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from argparse import Namespace
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.datastructures import State
from vllm.logger import init_logger

from vllm_twotower import ARCHITECTURE

if TYPE_CHECKING:
    from vllm.engine.protocol import EngineClient

logger = init_logger(f"vllm.{__name__}")

PATH = "/v1/twotower/stats"
RPC_METHOD = "twotower_stats"
#: Seconds between background refreshes of the ``/metrics`` snapshot; ``0`` turns them off
#: (the snapshot then changes only when ``/v1/twotower/stats`` is called).
INTERVAL_ENV = "TWOTOWER_STATS_INTERVAL_S"
DEFAULT_INTERVAL_S = 5.0
#: The engine answers RPCs between steps; a call stuck longer than this fails (503).
RPC_TIMEOUT_S = 30.0
#: Attribute of the app state holding this app's :class:`StatsSource`.
STATE_ATTR = "twotower_stats"

#: ``(metric name, aggregate key, help)`` of the counters; exposed with a ``_total`` suffix.
COUNTERS = (
    ("vllm:twotower_denoiser_passes", "nfe",
     "Denoiser forward passes (NFE) of TwoTower requests, mock_ar's included."),
    ("vllm:twotower_diffusion_blocks", "blocks",
     "Blocks denoised by mask_diffusion requests."),
    ("vllm:twotower_denoised_tokens", "denoised_tokens",
     "Tokens decided by the denoiser: mask_diffusion's whole blocks (including any cut at "
     "EOS or max_tokens), mock_ar's one per pass, speculative's drafts."),
    ("vllm:twotower_speculative_accepted_tokens", "accepted_tokens",
     "Drafted tokens the context tower accepted in speculative requests."),
    ("vllm:twotower_auto_diffusion_steps", "auto_diffusion_steps",
     "Engine steps in which an auto request denoised a block (load-aware decoding)."),
    ("vllm:twotower_auto_ar_steps", "auto_ar_steps",
     "Engine steps in which an auto request emitted one AR token (load-aware decoding)."),
    ("vllm:twotower_speculative_drafts", "speculative_drafts",
     "Engine steps in which a speculative request drafted and verified a block."),
    ("vllm:twotower_speculative_ar_steps", "speculative_ar_steps",
     "Engine steps in which a speculative request skipped the draft under load (AR token)."),
)  # fmt: skip
#: The same ratios over the server's lifetime; for a window, divide the counters' rates.
GAUGES = (
    ("vllm:twotower_tokens_per_denoiser_pass", "tokens_per_nfe",
     "Denoised tokens per denoiser pass since the server started."),
    ("vllm:twotower_denoiser_passes_per_block", "steps_per_block",
     "mask_diffusion denoiser passes per diffusion block since the server started."),
    ("vllm:twotower_accepted_tokens_per_verification", "accepted_per_verification",
     "speculative: drafted tokens accepted per verification step since the server started."),
    ("vllm:twotower_accepted_tokens_per_denoiser_pass", "accepted_per_nfe",
     "speculative: drafted tokens accepted per drafting denoiser pass since the server started."),
    ("vllm:twotower_step_cost_overhead_seconds", "step_cost_overhead_s",
     "Load-aware decoding's cost model: fixed seconds per engine step."),
    ("vllm:twotower_step_cost_context_position_seconds", "step_cost_context_position_s",
     "Load-aware decoding's cost model: seconds per context-tower position."),
    ("vllm:twotower_step_cost_denoiser_pass_seconds", "step_cost_denoiser_pass_s",
     "Load-aware decoding's cost model: seconds per denoiser pass."),
    ("vllm:twotower_step_cost_denoiser_position_seconds", "step_cost_denoiser_position_s",
     "Load-aware decoding's cost model: seconds per denoiser position."),
    ("vllm:twotower_expected_tokens_per_block", "expected_tokens_per_block",
     "Load-aware decoding: tokens a block emits up to EOS (moving average)."),
    ("vllm:twotower_expected_tokens_per_draft", "expected_tokens_per_draft",
     "Load-aware decoding: tokens a speculative draft step emits (moving average)."),
)  # fmt: skip


def interval_from_env() -> float:
    """The background refresh interval (:data:`INTERVAL_ENV`), refusing what is not a number."""
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        interval = float(raw) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV} must be a number of seconds, got {raw!r}") from None
    if interval < 0:
        raise ValueError(f"{INTERVAL_ENV} must be >= 0, got {raw!r}")
    return interval


class StatsSource:
    """Fetches the workers' stats and keeps the newest totals for the collector.

    A tensor-parallel engine answers with one table per rank; rank 0's (the first reply) is
    kept: its sampled tokens are the ones the scheduler and the client see.  The engine answers
    RPCs in the order they were sent, so a reply to an earlier call never replaces the totals
    from a later one: a scrape after a stats call sees at least that call's totals.
    """

    def __init__(self, engine_client: EngineClient, model_name: str) -> None:
        self.engine_client = engine_client
        self.model_name = model_name
        #: Totals (``RequestTable.stats()["aggregate"]``) from the newest call answered.
        self.aggregate: Mapping[str, float] | None = None
        self._sent = 0
        self._newest = -1
        self._task: asyncio.Task[None] | None = None
        #: Called with every newer :attr:`aggregate` (the multiprocess metric files' writer).
        self.on_update: Callable[[Mapping[str, float]], None] | None = None

    async def fetch(
        self, request_id: str | None = None, include_requests: bool = True
    ) -> dict[str, Any]:
        """Rank 0's ``twotower_stats(request_id, include_requests)``; updates :attr:`aggregate`."""
        order = self._sent
        self._sent += 1
        replies = await asyncio.wait_for(
            self.engine_client.collective_rpc(
                RPC_METHOD,
                kwargs={"request_id": request_id, "include_requests": include_requests},
            ),
            RPC_TIMEOUT_S,
        )
        stats = replies[0]
        if order > self._newest:
            self._newest, self.aggregate = order, stats["aggregate"]
            if self.on_update is not None:
                self.on_update(self.aggregate)
        return stats

    def start(self, interval_s: float) -> None:
        """Refresh :attr:`aggregate` every ``interval_s`` seconds (none when 0)."""
        if interval_s > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll(interval_s))

    async def stop(self) -> None:
        """Cancel the refresh task (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _poll(self, interval_s: float) -> None:
        healthy = True
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.fetch(include_requests=False)
            except Exception as e:  # keep the last totals; warn once per outage
                if healthy:
                    logger.warning("TwoTower stats refresh failed (%r); will retry", e)
                healthy = False
            else:
                healthy = True


class TwoTowerCollector(Collector):
    """Prometheus collector reporting the newest totals of the current :class:`StatsSource`."""

    def __init__(self) -> None:
        self.source: StatsSource | None = None

    def collect(self) -> Iterator[Metric]:
        source = self.source
        if source is None or source.aggregate is None:
            return
        yield from self._families(source.aggregate, [source.model_name])

    def describe(self) -> Iterator[Metric]:
        """The metric names without samples, so the registry can refuse duplicates."""
        return self._families(None, None)

    @staticmethod
    def _families(
        aggregate: Mapping[str, float] | None, labels: list[str] | None
    ) -> Iterator[Metric]:
        for kind, specs in ((CounterMetricFamily, COUNTERS), (GaugeMetricFamily, GAUGES)):
            for name, key, doc in specs:
                family = kind(name, doc, labels=["model_name"])
                if aggregate is not None and labels is not None:
                    family.add_metric(labels, aggregate[key])
                yield family


class MultiprocessGauges:
    """The snapshot as ``prometheus_client`` gauges, for ``/metrics`` under multiprocess mode.

    Every API server process asks the same engine, so each holds the same totals, only fetched
    at different moments.  Summing them, as multiprocess counters do, would count them once per
    process; so the totals are gauges merged by ``max`` (they only grow: the largest is the
    freshest) and keep their counter sample names (``..._total``), and the ratios are merged by
    ``mostrecent``.  The exposition type of the totals is therefore ``gauge`` here.
    """

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.gauges = {
            key: Gauge(f"{name}_total", doc, ["model_name"], registry=None, multiprocess_mode="max")
            for name, key, doc in COUNTERS
        }
        self.gauges.update(
            (key, Gauge(name, doc, ["model_name"], registry=None, multiprocess_mode="mostrecent"))
            for name, key, doc in GAUGES
        )

    def set(self, aggregate: Mapping[str, float]) -> None:
        """Write ``aggregate`` to this process's metric file."""
        for key, gauge in self.gauges.items():
            gauge.labels(self.model_name).set(aggregate[key])


#: One collector per process: registering a second one with the same names would fail, and a
#: process serves one app (tests that build several apps re-point it at the newest source).
COLLECTOR = TwoTowerCollector()
_registered = False


def install_collector(source: StatsSource) -> None:
    """Export ``source``'s snapshot to ``/metrics``: by :data:`COLLECTOR`, or by metric files.

    The collector is registered on first use; under ``PROMETHEUS_MULTIPROC_DIR`` (several API
    server processes) the snapshot goes to this process's metric file instead.
    """
    global _registered
    from vllm_twotower.vllm_internals import prometheus_registry

    if prometheus_registry() is not REGISTRY:
        source.on_update = MultiprocessGauges(source.model_name).set
        if source.aggregate is not None:
            source.on_update(source.aggregate)
        return
    COLLECTOR.source = source
    if not _registered:
        REGISTRY.register(COLLECTOR)
        _registered = True


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """An error in the OpenAI server's shape (``{"error": {message, type, param, code}}``)."""
    kinds = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}
    kind = kinds.get(status, "Error")
    body = {"message": message, "type": kind, "param": param, "code": status}
    return JSONResponse({"error": body}, status_code=status)


async def get_stats(raw_request: Request, request_id: str | None = None) -> JSONResponse:
    """``GET /v1/twotower/stats``: ``{"aggregate": {...}, "requests": {internal id: {...}}}``.

    ``aggregate`` covers every request the server has run (nfe, blocks, denoised_tokens,
    tokens_per_nfe, steps_per_block).  With ``request_id`` (the id of an OpenAI response, or the
    ``X-Request-Id`` header a client sent) ``requests`` keeps the engine requests it spawned
    (:func:`~vllm_twotower.engine.requests.matches_request_id`); none is a 404.
    """
    source: StatsSource | None = getattr(raw_request.app.state, STATE_ATTR, None)
    if source is None:
        return error(404, "TwoTower stats are unavailable: the served model is not TwoTower")
    try:
        stats = await source.fetch(request_id)
    except Exception as e:
        return error(503, f"TwoTower stats could not be read from the engine: {e!r}")
    if request_id is not None and not stats["requests"]:
        return error(
            404,
            f"no TwoTower stats for request_id {request_id!r} (unknown, or no longer kept)",
            param="request_id",
        )
    return JSONResponse(stats)


class TwoTowerStatsPlugin:
    """The ``twotower_stats`` endpoint plugin (entry point group ``vllm.endpoint_plugins``)."""

    name = "twotower_stats"
    #: Generation servers only: the CPU-only render server has no engine to ask.
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.source: StatsSource | None = None

    def attach_router(self, app: FastAPI) -> None:
        app.add_api_route(PATH, get_stats, methods=["GET"])
        # End the refresh task with the app rather than leave it to the loop's teardown.  (On
        # SIGTERM vLLM stops the engine client first: a poll in between fails, logged once.)
        serve = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(served: Any) -> AsyncIterator[Any]:
            async with serve(served) as value:
                try:
                    yield value
                finally:
                    if self.source is not None:
                        await self.source.stop()

        app.router.lifespan_context = lifespan

    async def init_state(
        self, engine_client: EngineClient | None, state: State, args: Namespace
    ) -> None:
        if engine_client is None:
            return
        model_config = engine_client.model_config
        if ARCHITECTURE not in (model_config.architectures or []):
            logger.info("Endpoint plugin %s: not a TwoTower model, %s disabled", self.name, PATH)
            return
        interval_s = interval_from_env()
        # The label vLLM's own metrics carry (a str once the config is built).
        model_name = str(model_config.served_model_name)
        self.source = source = StatsSource(engine_client, model_name)
        setattr(state, STATE_ATTR, source)
        try:  # so /metrics has the counters (at zero) from the start
            await source.fetch(include_requests=False)
        except Exception as e:
            logger.warning("TwoTower stats not readable yet (%r); retrying in the background", e)
        install_collector(source)
        source.start(interval_s)
