"""The two training stages and the checkpoint they produce.

Stage 1 trains the context tower and ``context_lm_head`` as an ordinary AR language model.
Stage 2 freezes them, copies the context tower (and its head) into the denoiser, and trains the
denoiser and the time conditioning with the MDLM objective (spec §6).  Both stages use AdamW
with a linear warm-up and a cosine decay to 10 %, gradient clipping at 1, and a seeded
``torch.Generator`` for every random choice, so a run is a function of its arguments.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_twotower.checkpoint import save_checkpoint
from vllm_twotower.config import TwoTowerConfig
from vllm_twotower.data import (
    WORKLOADS,
    Example,
    Workload,
    build_tokenizer,
    generate_split,
    save_tokenizer,
)
from vllm_twotower.params import TwoTowerParams
from vllm_twotower.reference.model import TwoTowerModel
from vllm_twotower.tools.make_tiny import init_random, tiny_config
from vllm_twotower.train.batching import (
    Encoded,
    PrefixBuckets,
    add_noise,
    ar_batch,
    ar_batches,
    block_items,
    encode_all,
)
from vllm_twotower.train.decoding import decode_exact_match
from vllm_twotower.train.objectives import ar_loss, diffusion_loss


def tasks_config() -> TwoTowerConfig:
    """The architecture of the embedded ``twotower-tasks`` checkpoint.

    Every Nemotron-H layer type but the dense MLP (which the real model does not use): Mamba-2,
    attention, MoE, three times, with a second attention layer in the last two groups.  Why
    five attention layers: the denoiser's first pass has nothing of its block written yet, so
    finding "letter *j* of key B's value" takes several hops through attention (find the
    value, pass what was found along the block, look up the letter after it), where AR makes
    one per token.  With three, copy and recall were where diffusion lost to AR; the two extra
    layers (4 % more parameters) raised the decoded validation accuracy of the same recipe from
    90.25 to 93.25 % (``docs/quality.md``).  Attention ``head_dim`` 32 (vLLM's CPU attention
    rejects 16), Mamba ``chunk_size`` 16 = the diffusion block size; ~2.4 M parameters per
    tower, so both towers fit the 20 MB budget in float32.
    """
    return tiny_config(
        hidden_size=128,
        pattern="M*EM**EM**E",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        mamba_num_heads=8,
        mamba_head_dim=32,
        ssm_state_size=32,
        n_groups=2,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        moe_shared_expert_intermediate_size=256,
        intermediate_size=0,
    )


def long_config() -> TwoTowerConfig:
    """The architecture of the embedded ``twotower-long`` checkpoint: :func:`tasks_config`'s.

    Why the same: it is the largest model of this layout that fits the 20 MB budget in float32
    (19.7 MB), and the long families ask for the skill its five attention layers were added for
    — find payload position *j* when writing answer position *j* — at offsets up to 120 instead
    of 12.  Training it on long sequences already takes the whole hour (``docs/quality.md``), so
    an architecture search of its own did not fit.  A function of its own all the same, so that
    the shipped ``config.json`` is checked against what this checkpoint was trained with, and a
    later change to either checkpoint's architecture does not silently move the other.
    """
    return tasks_config()


#: The architecture each workload's checkpoint is trained with (``TrainSettings.workload``).
WORKLOAD_CONFIGS: dict[str, Callable[[], TwoTowerConfig]] = {
    "short": tasks_config,
    "long": long_config,
}


@dataclass(frozen=True)
class TrainSettings:
    """Everything a run depends on (besides the architecture); logged with the losses."""

    seed: int = 0
    n_train: int = 150_000
    n_val: int = 800
    ar_steps: int = 6000
    ar_batch: int = 64
    ar_lr: float = 2e-3
    ar_answer_only: bool = True
    diffusion_steps: int = 12000
    diffusion_batch: int = 64
    diffusion_lr: float = 1e-3
    diffusion_ema: float = 0.999
    warmup: int = 100
    weight_decay: float = 0.01
    eval_every: int = 1000
    decode_threshold: float = 0.8
    #: The task set trained and validated on (:data:`vllm_twotower.data.WORKLOADS`).
    workload: str = "short"


#: Independent random streams of a run (see :func:`stream`).
AR_STREAM, DIFFUSION_STREAM, VALIDATION_STREAM = 0, 1, 2


def stream(seed: int, index: int) -> torch.Generator:
    """Random stream ``index`` of the run with ``seed``.

    Each stage draws from its own stream, so a stage rerun alone (stage 2 with ``--init-from``
    a trained context tower) draws exactly what it draws in a full run.  Stream 0 is
    ``manual_seed(seed)`` itself.
    """
    return torch.Generator().manual_seed(seed + 1_000_003 * index)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to ``peak / 10``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def init_model(config: TwoTowerConfig, seed: int) -> TwoTowerModel:
    """Fresh weights: Mamba's ``A``/``dt`` init from ``make_tiny``, small heads, no router bias.

    ``make_tiny`` sharpens its heads for commit-rule tests; a model to be trained wants the
    opposite (near-uniform initial predictions), and the router's correction bias only steers
    the top-k choice, which gets no gradient, so it starts (and stays) at zero.
    """
    model = TwoTowerModel(config)
    init_random(model, seed)
    std = config.hidden_size**-0.5
    generator = torch.Generator().manual_seed(seed + 1)
    for head in (model.context_lm_head, model.lm_head):
        head.weight.copy_(0.1 * std * torch.randn(head.weight.shape, generator=generator))
    for name, param in model.named_parameters():
        if name.endswith("e_score_correction_bias"):
            param.zero_()
    return model


@torch.no_grad()
def init_denoiser(model: TwoTowerModel, seed: int) -> None:
    """Denoiser := context tower (heads too), with time conditioning that starts as identity.

    ``shift, scale, gate = table[l] + t_block(t_embedder(t))``: zero ``t_block`` weights and
    tables ``(0, 0, 1)`` give ``x + 1·mixer(norm(x))`` at every ``t``, i.e. exactly the context
    tower's computation, and training grows the ``t`` dependence from there (adaLN-zero style:
    ``t_block``'s weight still gets a gradient through its non-zero input).  That input, the
    ``t_embedder``, is set to its seeded init (:func:`init_model`), not kept: a model loaded
    from a finished checkpoint holds a *trained* embedder, which would steer the new
    denoiser's first gradients and make ``--init-from CKPT --stages diffusion`` differ from
    the full run.
    """
    model.denoiser_tower.load_state_dict(model.context_tower.state_dict())
    model.lm_head.weight.copy_(model.context_lm_head.weight)
    model.t_embedder.load_state_dict(init_model(model.config, seed).t_embedder.state_dict())
    model.t_block[1].weight.zero_()
    model.t_block[1].bias.zero_()
    for table in model.scale_shift_tables:
        table.zero_()
        table[2].fill_(1.0)


class Logger:
    """JSON-lines loss log (one object per logged step) plus a tqdm bar per stage."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.start = time.monotonic()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def log(self, **record: object) -> None:
        record["elapsed_s"] = round(time.monotonic() - self.start, 1)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class WeightAverage:
    """Exponential moving average of parameters: the denoiser stage 2 validates and saves.

    Why: the denoiser's decoded accuracy jumps by points from one validation to the next (in
    two runs that differed only in the last bits from step 340 on, 71 against 66.5 % at step
    1 000), because the commit rule turns a small change of a confidence near γ into another
    answer.  The average of the last ~``1 / (1 - decay)`` steps' weights smooths that out, as
    diffusion models usually do (MDLM keeps one too); in one run it decoded the validation
    split at 89.6 % where the last weights gave 88.6 %.  ``decay = 0`` keeps the last weights.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.average = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for average, param in zip(self.average, self.params, strict=True):
            average.lerp_(param, 1 - self.decay)

    def load(self) -> None:
        """Overwrite the parameters with the average (the end of training)."""
        self._assign(self.average)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The average in place of the parameters, the trained weights restored afterwards."""
        trained = [p.detach().clone() for p in self.params]
        self.load()
        try:
            yield
        finally:
            self._assign(trained)

    @torch.no_grad()
    def _assign(self, weights: list[torch.Tensor]) -> None:
        for param, weight in zip(self.params, weights, strict=True):
            param.copy_(weight)


def _optimizer(params: Iterable[torch.nn.Parameter], settings: TrainSettings, lr: float):
    params = list(params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def _run_stage(
    name: str,
    params: list[torch.nn.Parameter],
    steps: int,
    peak_lr: float,
    settings: TrainSettings,
    loss_fn: Callable[[int], torch.Tensor],
    evaluate: Callable[[], dict[str, float]],
    logger: Logger,
    after_step: Callable[[], None] = lambda: None,
) -> None:
    """The optimisation loop shared by both stages (``loss_fn(step)`` draws its own batch)."""
    optimizer = _optimizer(params, settings, peak_lr)
    bar = tqdm(range(steps), desc=name, dynamic_ncols=True, mininterval=2.0)
    smoothed = None
    for step in bar:
        lr = lr_at(step, steps, peak_lr, settings.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        after_step()
        value = float(loss.detach())
        smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
        bar.set_postfix(loss=f"{smoothed:.3f}", lr=f"{lr:.1e}")
        if step % 10 == 0:
            logger.log(stage=name, step=step, loss=value, lr=lr, grad_norm=float(grad_norm))
        if (step + 1) % settings.eval_every == 0 or step + 1 == steps:
            metrics = evaluate()
            logger.log(stage=name, step=step + 1, **metrics)
            tqdm.write(f"{name} step {step + 1}: " + json.dumps(metrics))


@torch.no_grad()
def evaluate_ar(
    model: TwoTowerModel,
    val: list[Encoded],
    families: list[str],
    evaluated: tuple[str, ...],
    batch: int = 128,
) -> dict[str, float]:
    """Validation answer loss and greedy exact match (teacher-forced all-correct) per family."""
    model.eval()
    losses, correct = [], []
    for i in range(0, len(val), batch):
        b = ar_batch(val[i : i + batch]).to(model.device)
        loss, ok = ar_loss(model, b.inputs, b.targets, b.weights)
        losses.append(float(loss) * len(ok))
        correct.extend(ok.tolist())
    model.train()
    metrics = {
        "val_loss": sum(losses) / len(val),
        **_family_means(correct, families, evaluated, "acc"),
    }
    return {k: round(v, 4) for k, v in metrics.items()}


def _family_means(
    correct: list[bool], families: list[str], evaluated: tuple[str, ...], prefix: str
) -> dict[str, float]:
    """``{prefix_<family>: accuracy, prefix_mean: mean over families}`` for the ``evaluated``."""
    metrics = {}
    for family in evaluated:
        hits = [c for c, f in zip(correct, families, strict=True) if f == family]
        metrics[f"{prefix}_{family}"] = sum(hits) / max(1, len(hits))
    metrics[f"{prefix}_mean"] = sum(metrics[f"{prefix}_{f}"] for f in evaluated) / len(evaluated)
    return metrics


@torch.no_grad()
def evaluate_diffusion(
    model: TwoTowerModel,
    buckets: PrefixBuckets,
    val: list[Encoded],
    families: list[str],
    settings: TrainSettings,
    batch: int = 128,
) -> dict[str, float]:
    """Masked-token loss and accuracy under fixed random masks, and decoded exact match.

    The decoded measure (``dec_*``: greedy mask diffusion at ``settings.decode_threshold``, see
    :mod:`vllm_twotower.train.decoding`) is the one the quality suite reports; the masked-token
    one can keep improving while it does not.
    """
    model.eval()
    generator = stream(settings.seed, VALIDATION_STREAM)
    total, count, hits = 0.0, 0, 0
    for prefixes, blocks in buckets.iter_all(batch):
        canvas, _ = add_noise(blocks, generator)
        prefixes, canvas, blocks = (t.to(model.device) for t in (prefixes, canvas, blocks))
        loss, ok = diffusion_loss(model, prefixes, canvas, blocks)
        total += float(loss) * len(ok)
        count += len(ok)
        hits += int(ok.sum())
    workload = WORKLOADS[settings.workload]
    params = TwoTowerParams(confidence_threshold=settings.decode_threshold)
    decoded = decode_exact_match(model, val, params, max_new_tokens=workload.max_new_tokens)
    model.train()
    metrics = {"val_loss": total / count, "val_masked_acc": hits / count}
    metrics.update(_family_means(decoded.correct, families, workload.families, "dec"))
    metrics["dec_tokens_per_pass"] = decoded.tokens_per_pass
    return {k: round(v, 4) for k, v in metrics.items()}


def train(
    settings: TrainSettings,
    out: Path | None,
    *,
    config: TwoTowerConfig | None = None,
    log_path: Path | None = None,
    stages: tuple[str, ...] = ("ar", "diffusion"),
    device: str = "cpu",
    init_from: Path | None = None,
) -> TwoTowerModel:
    """Run the requested stages and write the checkpoint to ``out``.

    The model starts fresh, or from the checkpoint ``init_from`` (its architecture then wins
    over ``config``): ``stages=("diffusion",)`` with ``init_from`` trains a new denoiser on a
    trained context tower, which is how TwoTower itself is built on a frozen AR model.
    Batches are drawn on the CPU from the seeded generator and moved to ``device``, so a CUDA
    run sees the same data as a CPU run (its float rounding differs).
    """
    pretrained = None if init_from is None else TwoTowerModel.from_pretrained(init_from)
    if pretrained is not None:
        config = pretrained.config
    config = config or WORKLOAD_CONFIGS[settings.workload]()
    torch.manual_seed(settings.seed)
    logger = Logger(log_path)
    logger.log(
        stage="setup",
        settings=asdict(settings),
        config=config.to_hf_dict(),
        device=device,
        init_from=None if init_from is None else str(init_from),
    )
    tokenizer = build_tokenizer()
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(
            f"vocab_size {config.vocab_size} < tokenizer's {tokenizer.get_vocab_size()}"
        )
    workload: Workload = WORKLOADS[settings.workload]
    train_examples = generate_split(
        "train", settings.n_train, settings.seed, families=workload.training_mix
    )
    val_examples: list[Example] = generate_split(
        "validation", settings.n_val, settings.seed, families=workload.families
    )
    train_set, val_set = encode_all(tokenizer, train_examples), encode_all(tokenizer, val_examples)
    val_families = [e.family for e in val_examples]
    model = pretrained if pretrained is not None else init_model(config, settings.seed)
    model.to(device).train()

    if "ar" in stages:
        tower = [*model.context_tower.parameters(), *model.context_lm_head.parameters()]

        batches = ar_batches(
            train_set,
            settings.ar_batch,
            stream(settings.seed, AR_STREAM),
            answer_only=settings.ar_answer_only,
        )

        def ar_step(step: int) -> torch.Tensor:
            b = next(batches).to(device)
            return ar_loss(model, b.inputs, b.targets, b.weights)[0]

        _run_stage(
            "ar",
            tower,
            settings.ar_steps,
            settings.ar_lr,
            settings,
            ar_step,
            lambda: evaluate_ar(model, val_set, val_families, workload.families),
            logger,
        )

    if "diffusion" in stages:
        size = config.chunk_size
        init_denoiser(model, settings.seed)
        for p in [*model.context_tower.parameters(), *model.context_lm_head.parameters()]:
            p.requires_grad_(False)
        denoiser = [p for p in model.parameters() if p.requires_grad]
        average = WeightAverage(denoiser, settings.diffusion_ema)
        repeated = [
            item
            for item, example in zip(train_set, train_examples, strict=True)
            for _ in range(workload.diffusion_repeats.get(example.family, 1))
        ]
        train_buckets = PrefixBuckets(block_items(repeated, size))
        val_buckets = PrefixBuckets(block_items(val_set, size))
        generator = stream(settings.seed, DIFFUSION_STREAM)

        def validate_average() -> dict[str, float]:
            with average.applied():
                return evaluate_diffusion(model, val_buckets, val_set, val_families, settings)

        def diffusion_step(step: int) -> torch.Tensor:
            prefixes, blocks = train_buckets.sample(settings.diffusion_batch, generator)
            canvas, _ = add_noise(blocks, generator)
            batch = (t.to(device) for t in (prefixes, canvas, blocks))
            return diffusion_loss(model, *batch)[0]

        _run_stage(
            "diffusion",
            denoiser,
            settings.diffusion_steps,
            settings.diffusion_lr,
            settings,
            diffusion_step,
            validate_average,
            logger,
            after_step=average.update,
        )
        average.load()

    model.to("cpu").eval()
    if out is not None:
        save_checkpoint(out, model.state_dict(), replace(config))
        save_tokenizer(out, tokenizer)
    logger.log(stage="done")
    return model
