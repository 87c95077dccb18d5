"""Speed of each compiled kernel against its torch fallback, side by side, in one run.

* commit step: ``torch.ops.twotower.commit_step`` vs ``commit_step_torch`` (the unfused rule);
* MoE layer: ``torch.ops.twotower.moe_forward`` vs the reference layer (tokens grouped by expert
  in torch, the fallback) and vs a straightforward per-token torch loop;
* joint attention over a paged context: ``torch.ops.twotower.paged_block_attention`` vs its
  fallback, the dense path (gather the context, concatenate the block, SDPA in float32).

Usage::

    python benchmarks/kernels.py            # full shapes; rewrites the table in docs/kernels.md
    python benchmarks/kernels.py --smoke    # tiny shapes, a few seconds; prints only (CI)
    python benchmarks/kernels.py --device cuda --no-write   # the CUDA kernels (GPU check)

Timings are medians of interleaved runs after one warm-up (a variant slower than ``SLOW_S`` runs
once), on whatever CPU runs this (threads: ``torch.get_num_threads()``) or, with ``--device
cuda``, on the GPU (each timing synchronises the device); the machine is named in the output.
Commit rows also give the kernel's effective bandwidth: logit bytes read per second, the bound
a one-pass kernel is held to (for attention rows: context K/V bytes per second).  The MoE
weights of the real layer are 5 GB in float32; when the machine has too little free memory the
expert count is reduced and the table says so.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from docsections import machine_name

from vllm_twotower.commit import commit_step, commit_step_torch
from vllm_twotower.ops import extension_available, extension_status
from vllm_twotower.ops.moe import moe_forward
from vllm_twotower.ops.paged_attention import PagedKV, paged_block_attention
from vllm_twotower.reference.moe import expert_mlp, route
from vllm_twotower.reference.moe import moe_forward as reference_moe

DOC = Path(__file__).resolve().parent.parent / "docs" / "kernels.md"
BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"
MASK_ID = 3
SLOW_S = 10.0  # a variant slower than this runs once
BUDGET_S = 30.0  # time for the repeated rounds of one configuration


@dataclass
class Row:
    kernel: str
    shape: str
    timings: dict[str, float]  # name -> seconds; the first entry is the compiled kernel
    bytes_read: int | None = None  # input bytes a one-pass kernel must read (bandwidth column)

    def markdown(self, baselines: list[str]) -> str:
        ours = next(iter(self.timings.values()))
        cells = [self.kernel, self.shape, f"{ours * 1e3:.2f}"]
        for name in baselines:
            t = self.timings.get(name)
            cells += ["–", "–"] if t is None else [f"{t * 1e3:.2f}", f"{t / ours:.1f}×"]
        cells.append("–" if self.bytes_read is None else f"{self.bytes_read / ours / 1e9:.0f}")
        return "| " + " | ".join(cells) + " |"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    variants: dict[str, Callable[[], object]], *, repeats: int, device: torch.device
) -> dict[str, float]:
    """Median wall time of each variant, runs interleaved so that load from other processes hits
    every variant alike.  Each runs once as a warm-up; a variant slower than ``SLOW_S`` is not
    repeated (its warm-up time is reported), and the others repeat within ``BUDGET_S``."""

    def timed(fn: Callable[[], object]) -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start

    times = {name: [timed(fn)] for name, fn in variants.items()}
    repeat = {name: t[0] < SLOW_S for name, t in times.items()}
    per_round = sum(t[0] for name, t in times.items() if repeat[name])
    rounds = max(1, min(repeats, int(BUDGET_S / max(per_round, 1e-9))))
    for _ in range(rounds):
        for name, fn in variants.items():
            if repeat[name]:
                if len(times[name]) == 1 and rounds > 1:
                    times[name].clear()  # drop the warm-up once there are real runs
                times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def commit_row(
    batch: int,
    positions: int,
    vocab: int,
    dtype: torch.dtype,
    sampling: bool,
    repeats: int,
    device: torch.device,
) -> Row:
    """One commit step over fully masked canvases (every position predicted)."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, positions, vocab, generator=gen) * 3).to(dtype)
    canvas = torch.full((batch, positions), MASK_ID)
    args: dict[str, Any] = {
        "mask_id": MASK_ID,
        "threshold": torch.full((batch,), 0.8),
        "step": torch.zeros(batch, dtype=torch.long),
        "steps_per_block": torch.full((batch,), 16),
        "temperature": torch.full((batch,), 0.7 if sampling else 0.0),
        "seed": torch.arange(batch),
        "block_start": torch.zeros(batch, dtype=torch.long),
    }
    logits, canvas = logits.to(device), canvas.to(device)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    timings = measure(
        {
            "kernel": lambda: commit_step(logits, canvas, **args),
            "torch fallback": lambda: commit_step_torch(logits, canvas, **args),
        },
        repeats=repeats,
        device=device,
    )
    mode = "sampled T=0.7" if sampling else "greedy"
    shape = f"{batch}×{positions} rows × V {vocab}, {str(dtype)[6:]}, {mode}"
    return Row("commit_step", shape, timings, bytes_read=logits.nbytes)


def per_token_moe(hidden: torch.Tensor, **kw: Any) -> torch.Tensor:
    """Straightforward torch MoE: each token runs its own k experts one by one."""
    weights, expert_ids = route(
        hidden,
        kw["gate_weight"],
        kw["correction_bias"],
        top_k=kw["top_k"],
        routed_scaling_factor=kw["routed_scaling_factor"],
        norm_topk_prob=kw["norm_topk_prob"],
    )
    out = torch.zeros_like(hidden, dtype=torch.float32)
    for t in range(hidden.shape[0]):
        for j, expert in enumerate(expert_ids[t].tolist()):
            y = expert_mlp(hidden[t : t + 1], kw["up_weights"][expert], kw["down_weights"][expert])
            out[t] += weights[t, j] * y[0].float()
    if kw["shared_up"] is not None:
        out += expert_mlp(hidden, kw["shared_up"], kw["shared_down"]).float()
    return out.to(hidden.dtype)


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); a large number elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def moe_row(
    tokens: int,
    experts: int,
    top_k: int,
    hidden: int,
    width: int,
    shared: int,
    repeats: int,
    device: torch.device,
) -> Row:
    """One MoE layer in float32; fewer experts than asked when memory is short."""
    wanted = experts
    experts = min(wanted, max(top_k, int(0.4 * available_bytes() / (8 * width * hidden))))
    gen = torch.Generator().manual_seed(0)
    kw = {
        "gate_weight": torch.randn(experts, hidden, generator=gen) / hidden**0.5,
        "correction_bias": torch.randn(experts, generator=gen) * 0.01,
        "up_weights": torch.randn(experts, width, hidden, generator=gen) / hidden**0.5,
        "down_weights": torch.randn(experts, hidden, width, generator=gen) / width**0.5,
        "shared_up": torch.randn(shared, hidden, generator=gen) / hidden**0.5,
        "shared_down": torch.randn(hidden, shared, generator=gen) / shared**0.5,
        "top_k": top_k,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
    }
    x = torch.randn(tokens, hidden, generator=gen).to(device)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    timings = measure(
        {
            "kernel": lambda: moe_forward(x, **kw),
            "torch fallback": lambda: reference_moe(x, **kw),
            "per-token torch": lambda: per_token_moe(x, **kw),
        },
        repeats=repeats,
        device=device,
    )
    note = "" if experts == wanted else f" (reduced from {wanted}: memory)"
    shape = f"{tokens} tok, E {experts}{note} top-{top_k}, H {hidden}, I {width}, shared {shared}"
    return Row("moe_forward", shape, timings)


def paged_row(
    rows: int,
    context: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    repeats: int,
    device: torch.device,
) -> Row:
    """The denoiser's joint attention of one layer: 16 block queries per row over ``context``
    paged tokens (16-token blocks, shuffled block table, a dense ``[B, H, N, K|V]`` cache).
    The fallback is the dense path: gather the context, concatenate, SDPA in float32."""
    gen = torch.Generator().manual_seed(0)
    size, block = 16, 16
    blocks = rows * -(-context // block)
    cache = torch.randn(blocks, kv_heads, block, 2 * head_dim, generator=gen).to(dtype)
    table = torch.randperm(blocks, generator=gen).view(rows, -1)
    token = torch.arange(block)[:, None] * cache.stride(2)
    channel = torch.arange(head_dim)[None, :]
    paged = PagedKV(cache, table, token + channel, token + channel + head_dim)
    paged = PagedKV(*(t.to(device) for t in vars(paged).values()))

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(rows, size, heads, head_dim, generator=gen).to(dtype).to(device)

    q, k, v = rand(q_heads), rand(kv_heads), rand(kv_heads)
    kv_lens = torch.full((rows,), context, device=device)
    block_lens = torch.full((rows,), size, device=device)

    def call(use_kernel: bool) -> Callable[[], object]:
        return lambda: paged_block_attention(
            q,
            k,
            v,
            paged,
            kv_lens,
            block_lens,
            scale=head_dim**-0.5,
            causal=False,
            use_kernel=use_kernel,
        )

    timings = measure(
        {"kernel": call(True), "torch fallback": call(False)}, repeats=repeats, device=device
    )
    shape = (
        f"{rows} rows × 16 queries, context {context}, GQA {q_heads}/{kv_heads} × {head_dim}, "
        f"{str(dtype)[6:]}"
    )
    context_bytes = rows * context * kv_heads * 2 * head_dim * cache.element_size()
    return Row("paged_block_attention", shape, timings, bytes_read=context_bytes)


def table(rows: list[Row], device: torch.device) -> str:
    baselines = ["torch fallback", "per-token torch"]
    head = "| kernel | shape | kernel ms | " + " | ".join(
        f"{b} ms | speedup vs {b}" for b in baselines
    )
    lines = [head + " | kernel GB/s read |", "|" + "---|" * (4 + 2 * len(baselines))]
    lines += [row.markdown(baselines) for row in rows]
    machine = machine_name(device, torch.get_num_threads())
    return "\n".join([*lines, "", f"Measured on: {machine}."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, print only (CI)")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {DOC.name}")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not extension_available():
        # Nothing to compare; a CI smoke run on a build without the extension is not a failure.
        print(f"benchmarks/kernels.py: skipped, {extension_status()}")
        raise SystemExit(0 if args.smoke else 1)
    f32, bf16 = torch.float32, torch.bfloat16
    if args.smoke:
        commit_cfg = [(2, 4, 1000, f32, False), (2, 4, 1000, bf16, True)]
        moe_cfg = [(8, 8, 2, 32, 16, 32)]
        paged_cfg = [(2, 100, 4, 2, 8, f32)]
        repeats = 2
    else:
        commit_cfg = [
            (32, 16, 131072, f32, False),
            (32, 16, 131072, bf16, False),
            (4, 16, 131072, f32, False),
            (32, 16, 32768, f32, False),
            (4, 16, 131072, f32, True),
        ]
        moe_cfg = [
            (256, 128, 6, 2688, 1856, 3712),
            (16, 128, 6, 2688, 1856, 3712),
            (256, 16, 4, 512, 256, 512),
            (16, 16, 4, 512, 256, 512),
        ]
        paged_cfg = [
            (8, 16384, 4, 2, 32, f32),  # the embedded checkpoint's attention layers
            (8, 4096, 32, 2, 128, bf16),  # Nemotron-3-Nano's attention layers
            (1, 32768, 32, 2, 128, bf16),
        ]
        repeats = 5
    rows = [commit_row(*cfg, repeats, device) for cfg in commit_cfg]
    rows += [moe_row(*cfg, repeats, device) for cfg in moe_cfg]
    rows += [paged_row(*cfg, repeats, device) for cfg in paged_cfg]
    text = table(rows, device)
    print(text)
    if not args.smoke and not args.no_write and device.type == "cpu":
        doc = DOC.read_text()
        start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        DOC.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
