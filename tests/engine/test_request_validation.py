"""Per-request parameter plumbing that needs no engine: defaults, validation, slot table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm import SamplingParams

from vllm_twotower.config import DiffusionDefaults
from vllm_twotower.engine.params import ServerDefaults, TwoTowerParamsValidator
from vllm_twotower.engine.requests import MODE_ID, RequestTable


def defaults(**hf: object) -> ServerDefaults:
    return ServerDefaults.from_hf_config(DiffusionDefaults(), 16, SimpleNamespace(**hf))


def test_hf_overrides_change_server_defaults() -> None:
    d = defaults(default_mode="ar", confidence_threshold=0.9, block_size=8)
    p = d.resolve(None)
    assert (p.mode, p.confidence_threshold, p.block_size) == ("ar", 0.9, 8)
    assert d.resolve({"mode": "mock_ar"}).mode == "mock_ar"


@pytest.mark.parametrize(
    ("extra_args", "field"),
    [
        ({"mode": "beam"}, "mode"),
        ({"confidence_threshold": 0.0}, "confidence_threshold"),
        ({"confidence_threshold": 1.5}, "confidence_threshold"),
        ({"block_size": 32}, "block_size"),
        ({"steps_per_block": 2.5}, "steps_per_block"),
        ({"steps_per_block": 0}, "steps_per_block"),
    ],
)
def test_invalid_values_name_the_field(extra_args: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        defaults().resolve(extra_args)


def test_invalid_server_default_is_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        defaults(default_mode="nope")


def test_validator_hook_rejects_at_admission() -> None:
    TwoTowerParamsValidator.validate_params(SamplingParams(extra_args={"mode": "ar"}))
    with pytest.raises(ValueError, match="block_size"):
        TwoTowerParamsValidator.validate_params(SamplingParams(extra_args={"block_size": -1}))
    TwoTowerParamsValidator.validate_params(SamplingParams(logprobs=2))  # honoured
    with pytest.raises(ValueError, match="top_p"):
        TwoTowerParamsValidator.validate_params(SamplingParams(temperature=0.8, top_p=0.5))
    from vllm.sampling_params import StructuredOutputsParams

    guided = SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+"))
    with pytest.raises(ValueError, match="structured_outputs"):
        TwoTowerParamsValidator.validate_params(guided)


def test_request_table_slots_grow_and_recycle() -> None:
    table = RequestTable(defaults(), capacity=2)
    sp = [SamplingParams(extra_args={"mode": "ar"}), SamplingParams(seed=5), SamplingParams()]
    slots = table.slots(["a", "b", "c"], sp)
    assert len(set(slots.tolist())) == 3 and table.capacity >= 3
    assert table.mode[slots[0]] == MODE_ID["ar"]
    assert table.mode[slots[1]] == MODE_ID["mask_diffusion"]
    table.remove("a")
    again = table.slots(["d"], [SamplingParams()])
    assert again[0] == slots[0]
    assert table.slots(["b"], [SamplingParams()])[0] == slots[1]  # stable for a known request


def test_stats_cover_live_and_finished_requests() -> None:
    table = RequestTable(defaults(), capacity=4)
    a, _ = table.slots(["a", "b"], [SamplingParams(), SamplingParams(extra_args={"mode": "ar"})])
    table.nfe[a], table.blocks[a], table.decided[a] = 6, 2, 32
    table.remove("a")
    stats = table.stats()
    assert stats["requests"]["a"] == {
        "mode": "mask_diffusion", "nfe": 6, "blocks": 2, "denoised_tokens": 32,
        "tokens_per_nfe": 32 / 6,
    }  # fmt: skip
    assert stats["requests"]["b"]["nfe"] == 0
    assert stats["aggregate"]["steps_per_block"] == 3.0


def test_unseeded_requests_draw_the_same_seeds_on_every_rank() -> None:
    """Each tensor-parallel rank has its own table and samples its own tokens: a request that
    brings no seed must still get the same noise seed on every rank (vLLM's ``--seed``)."""
    ranks = [RequestTable(defaults(), capacity=2, seed=7) for _ in range(2)]
    sampled = SamplingParams(temperature=0.8)
    slots = [table.slots(["a", "b"], [sampled, sampled]) for table in ranks]
    assert [int(ranks[0].seed[s]) for s in slots[0]] == [int(ranks[1].seed[s]) for s in slots[1]]
    assert ranks[0].seed[slots[0][0]] != ranks[0].seed[slots[0][1]]
    other = RequestTable(defaults(), capacity=2, seed=8)
    (slot,) = other.slots(["a"], [sampled])
    assert other.seed[slot] != ranks[0].seed[slots[0][0]]  # the server seed decides the draw


def test_block_size_bound_is_the_trained_block_not_the_chunk_size() -> None:
    """The real config has ``chunk_size`` 128 and was trained on blocks of 16: 16 is the bound,
    and a refused request is told why and how a server opts in."""
    from vllm_twotower.engine.config_hook import block_size_reason, max_block_size

    real = SimpleNamespace(chunk_size=128)
    assert max_block_size(real) == 16
    assert max_block_size(real, trained_block_size=8) == 8
    bound = max_block_size(real, 16)
    served = ServerDefaults.from_hf_config(
        DiffusionDefaults(), bound, real, block_size_reason=block_size_reason(real, bound)
    )
    assert served.resolve({"block_size": 16}).block_size == 16
    for too_big in (17, 64, 128.0):
        with pytest.raises(ValueError, match="block_size") as err:
            served.resolve({"block_size": too_big})
        assert "trained with blocks of 16" in str(err.value)
        assert '"max_block_size": N' in str(err.value)

    opted = SimpleNamespace(chunk_size=128, max_block_size=64)
    bound = max_block_size(opted, 16)
    assert bound == 64
    served = ServerDefaults.from_hf_config(
        DiffusionDefaults(), bound, opted, block_size_reason=block_size_reason(opted, bound)
    )
    assert served.resolve({"block_size": 64}).block_size == 64
    with pytest.raises(ValueError, match="at most 64"):
        served.resolve({"block_size": 65})
    with pytest.raises(ValueError, match="max_block_size"):
        max_block_size(SimpleNamespace(max_block_size=0))
