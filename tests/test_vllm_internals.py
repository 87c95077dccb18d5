"""The adapter for vLLM internals: every declared name exists, nothing bypasses it, versions.

``vllm_twotower.vllm_internals`` is the one place the plugin touches private vLLM names.  These
tests make a vLLM upgrade fail loudly and readably (a list of what vanished) instead of at the
first request, and keep the rest of the plugin from growing new private accesses.
"""

from __future__ import annotations

import re
import tokenize
from pathlib import Path

import pytest

from vllm_twotower import vllm_internals as vi

PACKAGE = Path(vi.__file__).parent

#: Private vLLM names (runner, batch, cache and layer internals) that only the adapter may use.
PRIVATE_NAMES = re.compile(
    r"discard_request_mask|optimistic_seq_lens_cpu|input_batch|num_computed_tokens_cpu"
    r"|token_ids_cpu|static_forward_context|kv_cache_groups|kv_cache_config|MODELS_CONFIG_MAP"
    r"|mamba_get_block_table_tensor|mamba_cache_mode|is_conv_state_dim_first|\btped_"
    r"|conv_weights|split_hidden_states_B_C_fn|_custom_ops|get_prometheus_registry"
    r"|\.isa\b|\.kv_cache\b|use_v2_model_runner|SamplerOutput|from vllm\.v1\.worker"
    r"|NemotronHForCausalLMConfig|compute_layer_kv_cache_shape_bytes|KVQuantMode"
)


def test_every_declared_dependency_exists_in_the_installed_vllm() -> None:
    missing = vi.missing_dependencies()
    assert not missing, "vLLM internals the plugin relies on are gone:\n  " + "\n  ".join(missing)


def test_the_walker_reports_what_vanished(monkeypatch: pytest.MonkeyPatch) -> None:
    gone = {
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner._sample_v3",  # a method
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner#no_such_buffer",  # an instance field
        "vllm.no_such_module:anything",  # a module
    }
    monkeypatch.setattr(vi, "DEPENDENCIES", vi.DEPENDENCIES | gone)
    missing = vi.missing_dependencies()
    assert [m.split(" ")[0] for m in missing] == sorted(gone)
    assert "ModuleNotFoundError" in next(m for m in missing if "no_such_module" in m)


def test_the_overridden_runner_methods_are_declared() -> None:
    for cls in ("gpu_model_runner:GPUModelRunner", "cpu_model_runner:CPUModelRunner"):
        for method in vi.OVERRIDDEN_RUNNER_METHODS:
            assert f"vllm.v1.worker.{cls}.{method}" in vi.DEPENDENCIES


def code_lines(path: Path) -> dict[int, str]:
    """A source file's code by line number, strings and comments left out (docs may name
    vLLM internals; code may not)."""
    lines: dict[int, str] = {}
    words = (tokenize.NAME, tokenize.NUMBER)
    previous = None
    with path.open() as source:
        for token in tokenize.generate_tokens(source.readline):
            if token.type in (tokenize.STRING, tokenize.COMMENT):
                continue
            gap = " " if previous in words and token.type in words else ""
            line = token.start[0]
            lines[line] = lines.get(line, "") + gap + token.string
            previous = token.type
    return lines


def test_nothing_outside_the_adapter_names_vllm_internals() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {code}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "vllm_internals.py"
        for number, code in code_lines(path).items()
        if PRIVATE_NAMES.search(code)
    ]
    assert not offenders, "go through vllm_twotower.vllm_internals:\n" + "\n".join(offenders)


def test_the_scan_sees_code_but_not_docs(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text(
        '"""Reads ``runner.input_batch``."""\n'
        "rows = runner.input_batch  # here\n"
        "from vllm.v1.worker.cpu_worker import CPUWorker\n"
        "# from vllm.v1.worker import x\n"
    )
    flagged = [n for n, code in code_lines(source).items() if PRIVATE_NAMES.search(code)]
    assert flagged == [2, 3]


@pytest.mark.parametrize("installed", ["0.32.0", "0.32.0+cpu", "0.32.0+cu130"])
def test_the_supported_release_passes(installed: str) -> None:
    vi.check_vllm_version(installed)


@pytest.mark.parametrize("installed", ["0.33.0", "0.31.2", "0.32.1.dev4+g0a1b2c"])
def test_another_release_is_refused_naming_the_supported_one(
    installed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(vi.ALLOW_UNTESTED_VLLM_ENV, raising=False)
    with pytest.raises(RuntimeError) as error:
        vi.check_vllm_version(installed)
    message = str(error.value)
    assert f"supports vLLM {vi.SUPPORTED_VLLM_VERSION}" in message
    assert f"vLLM {installed} is installed" in message
    assert f"{vi.ALLOW_UNTESTED_VLLM_ENV}=1" in message


def test_the_opt_out_lets_another_release_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vi.ALLOW_UNTESTED_VLLM_ENV, "1")
    vi.check_vllm_version("0.33.0")
