"""Packaging: the vLLM plugin entry point and the compiled-extension loader."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch

import vllm_twotower
from vllm_twotower import ops


def test_plugin_entry_point_is_declared_and_register_is_idempotent() -> None:
    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "twotower"]
    assert ep.value == "vllm_twotower:register"
    register = ep.load()
    register()
    register()  # vLLM calls it once per process; twice must be harmless


def test_stats_endpoint_plugin_entry_point_is_declared() -> None:
    (ep,) = [e for e in entry_points(group="vllm.endpoint_plugins") if e.name == "twotower_stats"]
    plugin = ep.load()()
    assert plugin.name == ep.name  # vLLM allowlists endpoint plugins by this name (VLLM_PLUGINS)


def test_compiled_extension_reports_its_status() -> None:
    status = ops.extension_status()
    if not ops.extension_available():
        pytest.skip(f"extension not built here: {status}")
    assert int(torch.ops.twotower.version()) == ops.EXPECTED_OPS_VERSION
    assert vllm_twotower.__version__
