"""Check a TwoTower checkpoint against the vLLM model without reading its weights.

    python -m vllm_twotower.tools.check_checkpoint CKPT_DIR [--tp 2]

Builds ``NemotronHTwoTowerForCausalLM`` as vLLM builds it (``EngineArgs`` → ``VllmConfig`` with
the plugin's config hook, ``initialize_model`` under the model dtype) on the **meta device**,
reads only the safetensors headers (names, shapes), and pushes one meta tensor per stored tensor
through the model's real ``load_weights`` (the strict audit, vLLM's ``AutoWeightsLoader`` and
every parameter's TP weight loader) on each tensor-parallel rank: one process per rank, gloo on
loopback.  A partial or damaged 118 GB download is refused in seconds, naming the tensors,
before any GPU is involved.  Memory: a few GiB per rank, whatever the checkpoint's size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from queue import Empty

import torch

from vllm_twotower.checkpoint import canonical_name, shard_files
from vllm_twotower.vllm_internals import set_cpu_shm_identifier

MetaWeights = Iterable[tuple[str, torch.Tensor]]

#: How long a rank waits for the others to join or answer a collective.
RANK_TIMEOUT = timedelta(minutes=5)

_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@dataclass(frozen=True)
class RankReport:
    """What one rank's meta load found."""

    rank: int
    tp_size: int
    parameters: int  # elements of every parameter this rank holds (buffers are views/scalars)
    parameter_bytes: int  # at the dtypes vLLM built them in (bf16, routers float32)
    loaded: int  # parameter names the loader reported
    tensors: int  # checkpoint tensors pushed through it


def header_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(stored name, meta tensor)`` for every tensor of a safetensors checkpoint.

    Reads only each file's JSON header (8-byte length, then the header), never the data.
    """
    for file in shard_files(path):
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(info["dtype"], torch.float32)
            yield name, torch.empty(info["shape"], dtype=dtype, device="meta")


def engine_config(model: str | Path, tp_size: int, **engine_kwargs: object):
    """The ``VllmConfig`` vLLM would build for ``vllm serve MODEL -tp N`` (no tokenizer)."""
    from vllm.engine.arg_utils import EngineArgs

    kwargs = {"enforce_eager": True, "max_model_len": 4096, "skip_tokenizer_init": True}
    kwargs.update(engine_kwargs)
    args = EngineArgs(model=str(model), tensor_parallel_size=tp_size, **kwargs)
    return args.create_engine_config()


@contextlib.contextmanager
def model_parallel(tp_size: int, rank: int, init_method: str) -> Iterator[None]:
    """vLLM's distributed state for one rank of a TP group (gloo, no device)."""
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        ensure_model_parallel_initialized,
        init_distributed_environment,
    )

    set_cpu_shm_identifier(init_method)  # what vLLM's CPU worker does before this call
    init_distributed_environment(
        world_size=tp_size,
        rank=rank,
        distributed_init_method=init_method,
        local_rank=rank,
        backend="gloo",
        timeout=RANK_TIMEOUT,  # a rank that never joins fails the check instead of hanging it
    )
    ensure_model_parallel_initialized(tp_size, 1)
    try:
        yield
    finally:
        destroy_model_parallel()
        destroy_distributed_environment()


def build_on_meta(vllm_config: object) -> torch.nn.Module:
    """The model as vLLM's loader builds it (model dtype as default dtype), on the meta device."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    model_config = vllm_config.model_config
    with (
        set_current_vllm_config(vllm_config),
        set_default_torch_dtype(model_config.dtype),
        torch.device("meta"),
    ):
        return initialize_model(vllm_config=vllm_config)


def load_rank(vllm_config: object, weights: MetaWeights, rank: int, init_method: str) -> RankReport:
    """Build the model on the meta device as rank ``rank`` and load ``weights`` into it."""
    from vllm.config import set_current_vllm_config

    tp_size = vllm_config.parallel_config.tensor_parallel_size
    with set_current_vllm_config(vllm_config), model_parallel(tp_size, rank, init_method):
        model = build_on_meta(vllm_config)
        pushed = 0

        def counted() -> MetaWeights:
            nonlocal pushed
            for item in weights:
                pushed += 1
                yield item

        loaded = model.load_weights(counted())
        params = list(model.parameters())
        return RankReport(
            rank=rank,
            tp_size=tp_size,
            parameters=sum(t.numel() for t in params),
            parameter_bytes=sum(t.numel() * t.element_size() for t in params),
            loaded=len(loaded),
            tensors=pushed,
        )


def free_port() -> int:
    """A loopback port nobody listens on now, for a process group's TCP store."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layout_tensors(model: str | Path) -> MetaWeights:
    """Meta tensors for every tensor the config's layout expects (no checkpoint files needed)."""
    from vllm_twotower.config import TwoTowerConfig
    from vllm_twotower.layout import meta_checkpoint

    return meta_checkpoint(TwoTowerConfig.from_pretrained(model))


def _rank_main(
    vllm_config: object,
    rank: int,
    init_method: str,
    weights: Callable[[], MetaWeights],
    queue: object,
) -> None:
    try:
        from vllm.plugins import load_general_plugins

        load_general_plugins()  # as vLLM's workers do: registers this plugin's architecture
        queue.put(load_rank(vllm_config, weights(), rank, init_method))
    except BaseException as error:  # reported to the parent, which raises it
        queue.put(error)


def _collect(procs: list, queue: object) -> list[object]:
    """One report (or exception) per process; a rank that dies without one fails the check."""
    results: list[object] = []
    while len(results) < len(procs):
        try:
            results.append(queue.get(timeout=1.0))
        except Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead and queue.empty():
                raise RuntimeError(f"a rank exited with {dead[0]} without a report") from None
    return results


def check_checkpoint(
    model: str | Path, tp_size: int = 1, weights: Callable[[], MetaWeights] | None = None
) -> list[RankReport]:
    """Meta-load ``weights()`` (default: ``model``'s stored tensors) on ``tp_size`` ranks.

    With ``tp_size > 1`` every rank runs in its own spawned process (sharing this process's
    ``VllmConfig``): with rank 0 in the calling process, two of three runs here stalled in the
    group's first collective (cause not found); all-spawned ranks have not.  ``weights`` must
    therefore be picklable (a module-level function or a ``functools.partial``); each rank
    calls it for its own stream.
    """
    weights = weights or partial(header_tensors, str(model))
    init_method = f"tcp://127.0.0.1:{free_port()}"
    config = engine_config(model, tp_size)
    if tp_size == 1:
        return [load_rank(config, weights(), 0, init_method)]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [
        context.Process(target=_rank_main, args=(config, r, init_method, weights, queue))
        for r in range(tp_size)
    ]
    for proc in procs:
        proc.start()
    try:
        results = _collect(procs, queue)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return sorted(results, key=lambda r: r.rank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="checkpoint directory (config.json + shards)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    names = {canonical_name(name) for name, _ in header_tensors(args.model)}
    print(f"{args.model}: {len(names)} tensors in the safetensors headers")
    for report in check_checkpoint(args.model, args.tp):
        print(
            f"rank {report.rank}/{report.tp_size}: {report.tensors} tensors loaded strictly, "
            f"{report.parameters:,} elements, {report.parameter_bytes / 2**30:.2f} GiB"
        )


if __name__ == "__main__":
    main()
