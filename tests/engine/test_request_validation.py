"""Per-request parameter plumbing that needs no engine: defaults, validation, slot table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from vllm_twotower.config import DiffusionDefaults
from vllm_twotower.engine.params import ServerDefaults, TwoTowerParamsValidator
from vllm_twotower.engine.requests import MODE_ID, RequestTable
from vllm_twotower.params import MODES


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
    TwoTowerParamsValidator.validate_params(SamplingParams(temperature=0.8, top_p=0.5))
    with pytest.raises(ValueError, match="bad_words"):
        TwoTowerParamsValidator.validate_params(SamplingParams(bad_words=["AB"]))
    from vllm.sampling_params import StructuredOutputsParams

    guided = SamplingParams(
        structured_outputs=StructuredOutputsParams(regex="a+"),
        extra_args={"mode": "mask_diffusion"},
    )
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


#: Values of every JSON-representable kind, with the boundaries that broke the engine before.
_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, 1, 16, 17, 64, 65, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1e-300, 0.5, 1.0, 1.0000001, 1e30, 4.0, 16.0]),
    st.text(max_size=8),
    st.sampled_from(["ar", "mock_ar", "mask_diffusion", "AR", ""]),
    st.lists(st.integers(), max_size=3),
)
_KEYS = st.sampled_from(
    [
        "mode",
        "confidence_threshold",
        "steps_per_block",
        "block_size",
        "twotower_x",
        "steps_per_blocks",
        "kv_transfer_params",
        "other",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    extra_args=st.dictionaries(_KEYS, _ANY_VALUE, max_size=5),
    seed=st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**64 - 1)),
    temperature=st.floats(min_value=0.0, allow_nan=False, allow_infinity=True),
)
def test_whatever_admission_accepts_the_worker_stores(
    extra_args: dict, seed: int | None, temperature: float
) -> None:
    """Admission is total: a request that passes ``validate_params`` never raises when the
    worker's request table stores it (issue #17: overflow there killed the EngineCore)."""
    try:
        sp = SamplingParams(extra_args=extra_args, seed=seed, temperature=temperature)
    except (ValueError, VLLMValidationError):  # vLLM's own checks refused it first
        return
    try:
        TwoTowerParamsValidator.validate_params(sp)
        expected = defaults().resolve(extra_args)
    except ValueError:
        return
    table = RequestTable(defaults(), capacity=1)
    (slot,) = table.slots(["r"], [sp])
    assert MODES[int(table.mode[slot])] == expected.mode
    assert int(table.block_size[slot]) == expected.block_size
    assert int(table.steps_per_block[slot]) == expected.steps_per_block
    assert float(table.threshold[slot]) == pytest.approx(expected.confidence_threshold)


def test_totals_add_up_per_mode() -> None:
    """The totals are the sum of the per-mode counters, finished and live requests alike, and
    steps per block counts mask_diffusion's passes only (mock_ar's passes have no block)."""
    table = RequestTable(defaults(), capacity=4)
    md, mock, _ = table.slots(
        ["md", "mock", "ar"],
        [SamplingParams(), SamplingParams(extra_args={"mode": "mock_ar"}),
         SamplingParams(extra_args={"mode": "ar"})],
    )  # fmt: skip
    table.nfe[md], table.blocks[md], table.decided[md] = 6, 2, 32
    table.nfe[mock], table.decided[mock] = 40, 40
    table.remove("md")
    aggregate = table.stats()["aggregate"]
    modes = aggregate["modes"]
    assert modes["mask_diffusion"]["nfe"] == 6 and modes["mock_ar"]["nfe"] == 40
    assert modes["ar"] == {"mode": "ar", "nfe": 0, "blocks": 0, "denoised_tokens": 0,
                           "tokens_per_nfe": 0.0}  # fmt: skip
    for key in ("nfe", "blocks", "denoised_tokens"):
        assert aggregate[key] == sum(m[key] for m in modes.values())
    assert aggregate["steps_per_block"] == 3.0  # 6 passes / 2 blocks, not (6 + 40) / 2
    assert aggregate["tokens_per_nfe"] == (32 + 40) / (6 + 40)


def test_load_aware_overrides() -> None:
    """``auto`` runs by default; ``{"load_aware": false}`` (fixed schedules) refuses it,
    naming the switch; a fixed cost model must be four non-negative seconds."""
    assert defaults().resolve({"mode": "auto"}).mode == "auto"
    with pytest.raises(ValueError, match=r'"auto" needs load-aware decoding.*load_aware'):
        defaults(load_aware=False).resolve({"mode": "auto"})
    with pytest.raises(ValueError, match="load_aware"):
        defaults(load_aware="no")
    with pytest.raises(ValueError, match="auto"):  # the server default itself
        defaults(load_aware=False, default_mode="auto")
    assert defaults(auto_cost_model=[0.01, 0.001, 0, 0.001]).cost_model == (0.01, 0.001, 0, 0.001)
    for bad in ([0.01, 0.001], [0.01, -1, 0, 0]):
        with pytest.raises(ValueError, match="auto_cost_model"):
            defaults(auto_cost_model=bad)
