"""Training: both stages learn, the batched training pass *is* the inference pass, and the
embedded trained checkpoint is the documented one."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from vllm_twotower.checkpoints import (
    DEFAULT_CHECKPOINT,
    TWOTOWER_LONG,
    TWOTOWER_TASKS,
    WORKLOAD_CHECKPOINTS,
)
from vllm_twotower.config import TwoTowerConfig
from vllm_twotower.data import EOS_ID, LONG_WORKLOAD, MASK_ID, build_tokenizer, generate_split
from vllm_twotower.params import MASK_DIFFUSION, TwoTowerParams
from vllm_twotower.reference import SamplingSpec, TwoTowerModel, generate
from vllm_twotower.tools.make_tiny import init_random, tiny_config
from vllm_twotower.train import TrainSettings, long_config, tasks_config, train
from vllm_twotower.train.batching import (
    Encoded,
    PrefixBuckets,
    add_noise,
    ar_batch,
    block_items,
    encode_all,
)
from vllm_twotower.train.decoding import decode_exact_match
from vllm_twotower.train.objectives import (
    ar_loss,
    context_state,
    denoiser_logits,
    diffusion_loss,
)
from vllm_twotower.train.plot import load as plot_load
from vllm_twotower.train.trainer import WeightAverage, init_denoiser, init_model


@pytest.fixture(scope="module")
def encoded() -> list[Encoded]:
    return encode_all(build_tokenizer(), generate_split("train", 64, seed=3))


def _fit(loss_fn, params: list[torch.nn.Parameter], steps: int = 12) -> list[float]:
    """Adam on one fixed batch: the loss must go down if the gradients are wired right."""
    optimizer = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_ar_stage_loss_decreases(encoded: list[Encoded]) -> None:
    torch.manual_seed(0)
    model = init_model(tiny_config(), seed=0)
    batch = ar_batch(encoded[:16])
    params = [*model.context_tower.parameters(), *model.context_lm_head.parameters()]
    losses = _fit(lambda: ar_loss(model, batch.inputs, batch.targets, batch.weights)[0], params)
    assert losses[-1] < 0.8 * losses[0], losses


def test_diffusion_stage_loss_decreases_and_context_stays_frozen(encoded: list[Encoded]) -> None:
    torch.manual_seed(0)
    model = init_model(tiny_config(), seed=0)
    init_denoiser(model, seed=0)
    for p in [*model.context_tower.parameters(), *model.context_lm_head.parameters()]:
        p.requires_grad_(False)
    frozen = {k: v.clone() for k, v in model.context_tower.state_dict().items()}
    buckets = PrefixBuckets(block_items(encoded, 16))
    generator = torch.Generator().manual_seed(0)
    prefixes, blocks = buckets.sample(16, generator)
    canvas, _ = add_noise(blocks, generator)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = _fit(lambda: diffusion_loss(model, prefixes, canvas, blocks)[0], params)
    assert losses[-1] < 0.8 * losses[0], losses
    for name, value in model.context_tower.state_dict().items():
        assert torch.equal(value, frozen[name]), name


def test_identity_time_conditioning_makes_the_denoiser_the_context_tower() -> None:
    model = init_model(tiny_config(), seed=1).double()
    init_denoiser(model, seed=1)
    ids = torch.tensor([1, 20, 30, 40, 50, 3, 3, 7])
    empty = model.empty_context()
    expected, _ = model.denoiser_tower(ids, empty, causal=False)
    for t in (0.1, 1.0):
        hidden, _ = model.denoiser_tower(
            ids, empty, causal=False, modulation=model.time_modulation(t)
        )
        torch.testing.assert_close(hidden, expected)


def test_blocks_start_at_the_answer_and_are_eos_padded() -> None:
    item = Encoded(ids=(1, 10, 11, 12, *range(20, 40), EOS_ID), answer_start=4)
    first, second = block_items([item], 16)
    assert first.prefix == (1, 10, 11, 12) and first.block == tuple(range(20, 36))
    assert second.prefix == (1, 10, 11, 12, *range(20, 36))
    assert second.block == (36, 37, 38, 39, EOS_ID, *[EOS_ID] * 11)


def test_noise_masks_at_least_one_position() -> None:
    blocks = torch.full((256, 16), 7)
    canvas, masked = add_noise(blocks, torch.Generator().manual_seed(0), t_min=1e-3)
    assert masked.any(dim=1).all()
    assert torch.equal(canvas == MASK_ID, masked)
    fractions = masked.float().mean(dim=1)
    assert 0.35 < float(fractions.mean()) < 0.65  # t ~ U[1e-3, 1]


def test_batched_training_pass_equals_reference_denoise() -> None:
    """Block N of training == ``TwoTowerModel.denoise`` after blocks 0..N-1 were committed.

    The reference builds the context the inference way (prompt prefill, then block-wise
    extension); the training pass reads the whole prefix in one batched call and conditions
    each row on its own mask count.  Random time-conditioning weights make ``t`` matter.
    """
    torch.manual_seed(0)
    model = TwoTowerModel(tiny_config()).double()
    init_random(model, seed=5)
    prompt = torch.randint(5, 100, (3, 7))
    answer = torch.randint(5, 100, (3, 48))
    canvases = answer[:, 32:].clone()
    for row, n_masked in enumerate((16, 9, 1)):
        canvases[row, torch.randperm(16)[:n_masked]] = MASK_ID
    prefixes = torch.cat([prompt, answer[:, :32]], dim=1)  # blocks 0, 1 clean; block 2 noisy
    batched = denoiser_logits(model, canvases, context_state(model, prefixes))
    for row in range(3):
        _, state = model.extend_context(prompt[row], model.empty_context())
        for start in (0, 16):  # block-wise context extension, as generation does
            _, state = model.extend_context(answer[row, start : start + 16], state)
        t = int((canvases[row] == MASK_ID).sum()) / 16
        expected = model.denoise(canvases[row], state, t)
        torch.testing.assert_close(batched[row], expected, rtol=1e-9, atol=1e-9)


def test_weight_average_is_validated_then_loaded() -> None:
    """The average follows ``decay``; ``applied`` lends it and gives the trained weights back."""
    param = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage([param], decay=0.75)
    for value in (4.0, 8.0):
        with torch.no_grad():
            param.fill_(value)
        average.update()
    expected = torch.full((3,), 0.25 * 8 + 0.75 * (0.25 * 4))  # 3.0
    with average.applied():
        assert torch.equal(param.detach(), expected)
    assert torch.equal(param.detach(), torch.full((3,), 8.0))
    average.load()
    assert torch.equal(param.detach(), expected)
    last = WeightAverage([param], decay=0.0)
    with torch.no_grad():
        param.fill_(5.0)
    last.update()
    with last.applied():
        assert torch.equal(param.detach(), torch.full((3,), 5.0))


def test_train_end_to_end_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    """A full run writes a loadable checkpoint, and stage 2 rerun alone reproduces it.

    Stage 2 rerun on the finished checkpoint (``init_from``, what ``--init-from DIR --stages
    diffusion`` does) must give the full run's weights bit for bit: each stage draws from its
    own random stream and the denoiser side starts from its seeded init, never from the trained
    denoiser the checkpoint holds, so the shipped denoiser can be retrained without stage 1.
    """
    settings = TrainSettings(
        n_train=64, n_val=16, ar_steps=3, ar_batch=8, diffusion_steps=3,
        diffusion_batch=8, warmup=1, eval_every=2,
    )  # fmt: skip
    log = tmp_path / "log.jsonl"
    train(settings, tmp_path / "ckpt", config=tiny_config(), log_path=log)
    model = TwoTowerModel.from_pretrained(tmp_path / "ckpt")
    assert model.config == TwoTowerConfig.from_pretrained(tmp_path / "ckpt")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["stage"] for r in records} >= {"setup", "ar", "diffusion", "done"}
    assert any("dec_mean" in r and "dec_tokens_per_pass" in r for r in records)

    rerun = train(settings, None, init_from=tmp_path / "ckpt", stages=("diffusion",))
    full = model.state_dict()
    for name, weight in rerun.state_dict().items():
        assert torch.equal(weight, full[name]), name


def test_batched_decoding_equals_reference_generation() -> None:
    """The stage-2 validation decode is :func:`generate` in mask diffusion, batched."""
    model = TwoTowerModel.from_pretrained(TWOTOWER_TASKS)
    examples = generate_split("test", 24, seed=0)
    items = encode_all(build_tokenizer(), examples)
    params = TwoTowerParams(mode=MASK_DIFFUSION, confidence_threshold=0.8)
    outcome = decode_exact_match(model, items, params, max_new_tokens=32, batch=5)
    prompts = [item.ids[: item.answer_start] for item in items]
    results = generate(model, prompts, params, SamplingSpec(max_new_tokens=32))
    for item, result, correct in zip(items, results, outcome.correct, strict=True):
        answer = list(item.ids[item.answer_start :])
        assert correct == (result.output_ids[: len(answer)] == answer)
    assert outcome.passes == sum(r.nfe for r in results)
    assert outcome.committed == sum(sum(r.tokens_per_step) for r in results)
    assert 0 < sum(outcome.correct) < len(items)  # the comparison covers both outcomes


def test_each_workload_has_its_embedded_checkpoint() -> None:
    assert DEFAULT_CHECKPOINT == TWOTOWER_TASKS
    assert WORKLOAD_CHECKPOINTS == {"short": TWOTOWER_TASKS, "long": TWOTOWER_LONG}


@pytest.mark.parametrize(
    ("checkpoint", "config_of"),
    [(TWOTOWER_TASKS, tasks_config), (TWOTOWER_LONG, long_config)],
    ids=["twotower-tasks", "twotower-long"],
)
def test_embedded_checkpoint_is_the_trained_one(
    checkpoint: Path, config_of: Callable[[], TwoTowerConfig]
) -> None:
    config = TwoTowerConfig.from_pretrained(checkpoint)
    assert config.to_hf_dict() == config_of().to_hf_dict()
    assert set(config.pattern) == {"M", "*", "E"}
    assert (config.head_dim, config.chunk_size, config.vocab_size) == (32, 16, 128)
    d = config.diffusion
    assert (d.confidence_threshold, d.block_size, d.steps_per_block, d.mask_token_id) == (
        0.8, 16, 16, MASK_ID,
    )  # fmt: skip
    size = sum(f.stat().st_size for f in checkpoint.iterdir())
    assert size <= 20 * 2**20
    model = TwoTowerModel.from_pretrained(checkpoint)
    towers = sum(p.numel() for p in model.context_tower.parameters())
    assert 1_000_000 < towers < 10_000_000
    # Both ship the one tokenizer the task data is encoded with.
    shipped = json.loads((checkpoint / "tokenizer.json").read_text())
    assert shipped == json.loads(build_tokenizer().to_str())


def test_long_workload_trains_and_validates_on_the_long_families(tmp_path: Path) -> None:
    """``workload="long"`` draws the long training mix and validates (AR and decoded) on the
    long families with the long budget, so every validation answer can be reproduced."""
    settings = TrainSettings(
        n_train=24, n_val=6, ar_steps=2, ar_batch=4, diffusion_steps=2,
        diffusion_batch=4, warmup=1, eval_every=2, workload="long",
    )  # fmt: skip
    log = tmp_path / "log.jsonl"
    train(settings, None, config=tiny_config(), log_path=log)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    ar = next(r for r in records if r["stage"] == "ar" and "acc_mean" in r)
    dec = next(r for r in records if r["stage"] == "diffusion" and "dec_mean" in r)
    families = set(LONG_WORKLOAD.families)
    assert {k.removeprefix("acc_") for k in ar if k.startswith("acc_")} == {*families, "mean"}
    assert {k.removeprefix("dec_") for k in dec if k.startswith("dec_")} == {
        *families, "mean", "tokens_per_pass",
    }  # fmt: skip


def test_plot_merges_logs_with_a_rerun_stage(tmp_path: Path) -> None:
    """``train.plot`` of a full run's log then a stage-2 rerun's: stage 2 is the rerun's."""
    full, rerun = tmp_path / "full.jsonl", tmp_path / "rerun.jsonl"
    first = [
        {"stage": "setup"},
        {"stage": "ar", "step": 0, "loss": 4.0},
        {"stage": "diffusion", "step": 0, "loss": 3.0},
    ]
    full.write_text("\n".join(json.dumps(r) for r in first))
    rerun.write_text(json.dumps({"stage": "diffusion", "step": 0, "loss": 2.0}))
    records = plot_load([full, rerun])
    assert [r.get("loss") for r in records] == [None, 4.0, 2.0]
