"""No silent ignoring: every ``SamplingParams`` field is honoured or refused with its name.

The walk over the installed ``SamplingParams`` makes a field added by a future vLLM fail here
until it is classified in ``vllm_twotower.engine.sampling_fields``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from vllm import SamplingParams

from vllm_twotower.engine.params import TwoTowerParamsValidator
from vllm_twotower.engine.sampling_fields import FIELDS, HONOURED, INTERNAL, REFUSED
from vllm_twotower.params import MODES


def sampling_params_fields() -> set[str]:
    if dataclasses.is_dataclass(SamplingParams):
        return {f.name for f in dataclasses.fields(SamplingParams)}
    return set(SamplingParams.__struct_fields__)  # msgspec.Struct


def refused_examples() -> dict[str, Any]:
    """A value that would change the output, for every refused field."""

    return {
        "thinking_token_budget": 10, "watermarking": object(), "trace_decode_token_ids": [5],
        "routed_experts_prompt_start": 1,
    }  # fmt: skip


def test_every_field_of_the_installed_sampling_params_is_classified() -> None:
    fields = sampling_params_fields()
    assert fields - FIELDS.keys() == set(), "classify these in engine/sampling_fields.py"
    assert FIELDS.keys() - fields == set(), "these are no longer SamplingParams fields"
    assert {f.handling for f in FIELDS.values()} == {HONOURED, REFUSED, INTERNAL}


def test_every_refused_field_is_refused_naming_it() -> None:
    examples = refused_examples()
    assert examples.keys() == {n for n, f in FIELDS.items() if f.handling == REFUSED}
    for name, value in examples.items():
        params = SamplingParams(max_tokens=8)
        setattr(params, name, value)  # bypasses SamplingParams' own checks of combinations
        with pytest.raises(ValueError, match=rf"^{name}=") as error:
            TwoTowerParamsValidator.validate_params(params)
        assert "not supported by the TwoTower engine" in str(error.value)


@pytest.mark.parametrize("name", ["structured_outputs", "bad_words"])
def test_out_of_order_knobs_only_in_one_token_modes(name: str) -> None:
    """A grammar and bad words constrain a token by the tokens before it: honoured where a
    step chooses one token after the known output, refused (pointing to ar) where a block
    commits out of order or a draft several tokens at once."""
    from vllm.sampling_params import StructuredOutputsParams

    value = StructuredOutputsParams(regex="a+") if name == "structured_outputs" else ["AB"]
    for mode in MODES:
        params = SamplingParams(extra_args={"mode": mode}, **{name: value})
        if mode in ("ar", "mock_ar"):
            TwoTowerParamsValidator.validate_params(params)
        else:
            with pytest.raises(ValueError, match=rf'^{name}=.*"mode": "ar"'):
                TwoTowerParamsValidator.validate_params(params)


@pytest.mark.parametrize(
    ("name", "value"),
    [("presence_penalty", 0.5), ("frequency_penalty", -0.5), ("repetition_penalty", 1.2),
     ("logit_bias", {5: 2.0}), ("allowed_token_ids", [5, 9]), ("min_tokens", 3)],
)  # fmt: skip
def test_history_dependent_knobs_are_refused_in_speculative_only(name: str, value: Any) -> None:
    """Speculative verifies a whole draft in one pass: a knob that needs each position's own
    history is refused there (pointing to ar), honoured in the other modes; its neutral value
    (what clients send for "off") is accepted in every mode."""
    for mode in MODES:
        params = SamplingParams(temperature=0.7, extra_args={"mode": mode}, **{name: value})
        if mode == "speculative":
            with pytest.raises(ValueError, match=rf'^{name}=.*"mode": "ar"'):
                TwoTowerParamsValidator.validate_params(params)
        else:
            TwoTowerParamsValidator.validate_params(params)
        TwoTowerParamsValidator.validate_params(
            SamplingParams(temperature=0.7, extra_args={"mode": mode})
        )


@pytest.mark.parametrize("mode", MODES)
def test_neutral_values_of_refused_fields_are_accepted(mode: str) -> None:
    # What clients send for "off": lm-eval and the openai client send top_p=1, top_k=-1, ...
    TwoTowerParamsValidator.validate_params(
        SamplingParams(top_p=1.0, top_k=-1, min_p=0.0, presence_penalty=0.0,
                       frequency_penalty=0.0, repetition_penalty=1.0, min_tokens=0,
                       logit_bias={}, bad_words=[], temperature=0.7, seed=3, n=2,
                       stop=["x"], prompt_logprobs=1, extra_args={"mode": mode})
    )  # fmt: skip


def test_a_generation_config_default_the_engine_cannot_apply_fails_at_start(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """vLLM 0.32 reads only honoured fields from generation_config.json (penalties, filters,
    temperature, max_new_tokens): they start.  The guard refuses any other a later vLLM reads."""
    from tests.engine.test_runner_selection import engine_config
    from vllm_twotower.engine.config_hook import refuse_unsupported_generation_defaults

    model = tmp_path / "penalised"
    shutil.copytree(tiny_checkpoint, model)
    generation = json.loads((model / "generation_config.json").read_text())
    honoured = {"repetition_penalty": 1.1, "top_p": 0.95}
    (model / "generation_config.json").write_text(json.dumps({**generation, **honoured}))
    engine_config(model)
    with pytest.raises(
        ValueError, match=r"generation_config: thinking_token_budget=10 .*--generation-config vllm"
    ):
        refuse_unsupported_generation_defaults({"thinking_token_budget": 10, "top_p": 0.95})


def test_the_design_doc_table_lists_every_field_with_its_handling() -> None:
    """docs/engine-design.md §5: each field in exactly one row, whose handling cell says what
    FIELDS says (and, for a field honoured in some modes only, names them)."""
    doc = (Path(__file__).parents[2] / "docs" / "engine-design.md").read_text()
    section = doc[doc.index("## 5.") : doc.index("## 6.")]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not line.startswith("| `") or len(cells) != 3:
            continue
        for name in set(re.findall(r"`([a-z_]+)`", cells[0])):
            if name in FIELDS:
                assert name not in rows, f"{name} is in two rows"
                rows[name] = cells[1]
    assert rows.keys() == FIELDS.keys()
    for name, field in FIELDS.items():
        assert rows[name].startswith(field.handling), (name, rows[name])
        if field.handling == HONOURED and field.modes != MODES:
            assert all(f"`{m}`" in rows[name] for m in field.modes), (name, rows[name])
