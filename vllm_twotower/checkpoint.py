"""Hugging Face-layout safetensors I/O for TwoTower checkpoints.

Reads single-file (``model.safetensors``) and sharded (``model.safetensors.index.json``)
checkpoints, maps the older single-tower spellings (``backbone.`` for ``context_tower.``,
``embedding.`` for ``embeddings.``) onto the canonical names, converts any stored dtype to the
requested one, and reports missing and unexpected tensors by name.  The vLLM model's
``load_weights`` uses :func:`canonical_name` too, so both paths agree on what a name means.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_twotower.config import TwoTowerConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_SPELLINGS = (
    (re.compile(r"^backbone\."), "context_tower."),
    (re.compile(r"^(context_tower|denoiser_tower)\.embedding\."), r"\1.embeddings."),
)


#: The dtype router weights and ``e_score_correction_bias`` are kept in, whatever the model
#: dtype: NVIDIA's code and vLLM's NemotronH MoE keep them in float32 (and route in float64 /
#: float32); a bf16 router changes the expert choice on close scores.
ROUTER_DTYPE = torch.float32
_ROUTER_TENSOR = re.compile(r"\.mixer\.gate\.(weight|e_score_correction_bias)$")


def is_router_tensor(name: str) -> bool:
    """Whether a checkpoint / state-dict name is a router weight or correction bias."""
    return _ROUTER_TENSOR.search(name) is not None


def kept_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype tensor ``name`` is kept in by a model running in ``dtype``."""
    return ROUTER_DTYPE if is_router_tensor(name) else dtype


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not match the model's tensors."""


def canonical_name(name: str) -> str:
    """Map a stored tensor name onto its canonical TwoTower name."""
    for pattern, replacement in _SPELLINGS:
        name = pattern.sub(replacement, name)
    return name


def shard_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (or a single ``.safetensors`` file)."""
    path = Path(path)
    if path.is_file():
        return [path]
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: field 'weight_map' is missing or not an object")
        files = [path / f for f in sorted(set(weight_map.values()))]
    elif (path / SINGLE_FILE).exists():
        files = [path / SINGLE_FILE]
    else:
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{path}: shard files listed in {INDEX_FILE} are missing: {missing}")
    return files


def iter_tensors(
    path: str | Path, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(canonical name, tensor)`` for every stored tensor, converted to ``dtype``
    (routers to :data:`ROUTER_DTYPE`)."""
    seen: set[str] = set()
    for file in shard_files(path):
        with safe_open(str(file), framework="pt") as f:
            for stored in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = canonical_name(stored)
                if name in seen:
                    raise CheckpointError(f"{file}: tensor '{name}' is stored twice")
                seen.add(name)
                tensor = f.get_tensor(stored)
                yield name, tensor if dtype is None else tensor.to(kept_dtype(name, dtype))


def load_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint under their canonical names."""
    return dict(iter_tensors(path, dtype))


def name_list(names: list[str], limit: int = 32) -> str:
    """``names`` for an error message, the first ``limit`` of them and a count of the rest.

    A checkpoint missing a whole tower lacks thousands of tensors; the message stays readable.
    """
    shown = ", ".join(names[:limit])
    return f"[{shown}]" if len(names) <= limit else f"[{shown}, ... and {len(names) - limit} more]"


def check_names(expected: set[str], found: set[str], *, source: str) -> None:
    """Raise :class:`CheckpointError` naming every missing and unexpected tensor."""
    missing = sorted(expected - found)
    unexpected = sorted(found - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {name_list(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {name_list(unexpected)}")
        raise CheckpointError(f"{source}: " + "; ".join(parts))


def save_checkpoint(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    config: TwoTowerConfig,
    *,
    max_shard_bytes: int | None = None,
) -> None:
    """Write ``config.json``, ``generation_config.json`` and the tensors in HF layout.

    With ``max_shard_bytes`` the tensors are split into ``model-0000i-of-0000n.safetensors``
    shards plus ``model.safetensors.index.json``, as large Hugging Face checkpoints are.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    (path / "generation_config.json").write_text(
        json.dumps(config.generation_config_dict(), indent=2) + "\n"
    )
    tensors = {name: t.detach().contiguous() for name, t in state_dict.items()}
    if max_shard_bytes is None:
        save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
