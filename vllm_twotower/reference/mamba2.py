"""Mamba-2 (SSD) mixer of Nemotron-H, with explicit initial conv/SSM states.

The denoiser tower seeds its Mamba layers from the context tower's states, and the context tower
continues its own scan block by block, so every function here takes an initial state and returns
the final one.  The chunked SSD scan (:func:`ssd_chunk_scan`) is what the model runs; the exact
sequential recurrence (:func:`ssd_sequential`) is the definition it is tested against.

Shapes are for one sequence: ``T`` tokens, ``nh`` heads of ``hd`` channels, state size ``N``;
every function also accepts leading batch dimensions (``vllm_twotower.train`` uses them).
The scan runs in float32 whatever the model dtype (seeded states can exceed bf16's range).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from vllm_twotower.reference.dtypes import at_least_float32


@functools.cache
def _tril_masks(length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of ``(not strictly below, above)`` the diagonal of a ``length × length`` matrix.

    Made outside inference mode: a cached inference tensor could not enter autograd later
    (training uses this module too).
    """
    with torch.inference_mode(False):
        ones = torch.ones(length, length, dtype=torch.bool, device=device)
        return ~torch.tril(ones, diagonal=-1), ~torch.tril(ones)


def segsum(x: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum(x[..., j+1 : i+1])`` for ``j <= i``, ``-inf`` above the diagonal.

    Summed as a cumulative sum of masked copies rather than as ``cumsum[i] - cumsum[j]``, which
    cancels catastrophically once the cumulative decay is large.
    """
    length = x.shape[-1]
    not_below, above = _tril_masks(length, x.device)
    x = x.unsqueeze(-1).expand(*x.shape, length).masked_fill(not_below, 0)
    return torch.cumsum(x, dim=-2).masked_fill(above, float("-inf"))


def ssd_sequential(
    x: torch.Tensor,
    dt: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    initial_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact recurrence ``h_t = exp(dt_t·a)·h_{t-1} + dt_t·x_t⊗B_t``, ``y_t = h_t·C_t``.

    Args:
        x: ``[T, nh, hd]``; dt: ``[T, nh]`` (after softplus); a: ``[nh]`` (negative);
        b, c: ``[T, nh, N]`` (already broadcast from groups to heads);
        initial_state: ``[nh, hd, N]``.

    Returns:
        ``(y [T, nh, hd], final_state [nh, hd, N])`` without the ``D`` skip term.
    """
    state = initial_state
    ys = []
    for t in range(x.shape[0]):
        decay = torch.exp(dt[t] * a)[:, None, None]
        state = decay * state + (dt[t][:, None, None] * x[t][:, :, None]) * b[t][:, None, :]
        ys.append(torch.einsum("hpn,hn->hp", state, c[t]))
    return torch.stack(ys) if ys else x.new_zeros(x.shape), state


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    initial_state: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same result as :func:`ssd_sequential`, computed chunk-parallel (Mamba-2's SSD form).

    Within a chunk the output is a masked (decay-weighted) attention-like product; across chunks
    only the states at chunk ends are carried, starting from ``initial_state``.  Padding to a
    whole number of chunks uses ``dt = 0``, which neither decays nor feeds the state.

    Written as two-operand matrix products in a heads-first layout: the engine runs this for
    every Mamba layer of every denoiser pass on a block of one chunk, where the number of torch
    operations, not arithmetic, sets the cost (multi-operand ``einsum`` costs ~4× the ops).
    """
    lead = x.dim() - 3  # number of leading (batch) dimensions
    length = x.shape[-3]
    pad = (-length) % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        b = F.pad(b, (0, 0, 0, 0, 0, pad))
        c = F.pad(c, (0, 0, 0, 0, 0, pad))
    n_chunks = x.shape[-3] // chunk_size

    def heads_first(t: torch.Tensor) -> torch.Tensor:  # [..., T, nh, k] -> [..., C, nh, L, k]
        return t.unflatten(lead, (n_chunks, chunk_size)).transpose(-3, -2)

    a_dt = heads_first((dt * a).unsqueeze(-1)).squeeze(-1)  # [..., C, nh, L]
    a_cumsum = torch.cumsum(a_dt, dim=-1)
    x_dt = heads_first(x * dt.unsqueeze(-1))  # [..., C, nh, L, hd]
    b, c = heads_first(b), heads_first(c)  # [..., C, nh, L, N]

    # 1. outputs from inputs of the same chunk: ((C Bᵀ) ∘ decay) X
    y = ((c @ b.transpose(-1, -2)) * torch.exp(segsum(a_dt))) @ x_dt

    # 2. each chunk's contribution to the state at its end: (X ∘ decay to end)ᵀ B
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # [..., C, nh, L]
    chunk_states = (x_dt * decay_to_end.unsqueeze(-1)).transpose(-1, -2) @ b  # [..., C, nh, hd, N]

    # 3. states entering each chunk and the final state, carried from the initial state
    chunk_decay = torch.exp(a_cumsum[..., -1])  # [..., C, nh]: decay across each chunk
    if n_chunks == 1:  # the denoiser's block: no carry between chunks
        prev_states = initial_state.unsqueeze(-4)
        final_state = (
            chunk_decay[..., 0, :, None, None] * initial_state + chunk_states[..., 0, :, :, :]
        )
    else:
        states = torch.cat([initial_state.unsqueeze(-4), chunk_states], dim=-4)
        chunk_ends = F.pad(a_cumsum[..., -1].transpose(-1, -2), (1, 0))  # [..., nh, C+1]
        carry = torch.exp(segsum(chunk_ends))  # [..., nh, C+1, C+1]
        states = torch.einsum("...hzc,...chpn->...zhpn", carry, states)
        prev_states, final_state = states[..., :-1, :, :, :], states[..., -1, :, :, :]

    # 4. outputs from the state entering each chunk: exp(cumsum) · C hᵀ
    y = y + (c @ prev_states.transpose(-1, -2)) * torch.exp(a_cumsum).unsqueeze(-1)

    y = y.transpose(-3, -2).flatten(lead, lead + 1)  # [..., T(+pad), nh, hd]
    return y[..., :length, :, :], final_state


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution continuing from ``conv_state``.

    Args:
        x: ``[T, D]`` inputs; weight: ``[D, 1, K]``; conv_state: ``[D, K-1]``, the previous
            ``K-1`` inputs (oldest first; zeros for a fresh sequence).

    Returns:
        ``(outputs [T, D] before the activation, new conv state [D, K-1])``.

    Computed as ``K`` shifted multiply-adds in at least float32: for the few tokens of a block
    (and Mamba's K = 4) this is several times faster on CPU than ``F.conv1d``, whose depthwise
    path is slow for short sequences (and much slower in bfloat16).
    """
    window = torch.cat([conv_state, x.transpose(-1, -2)], dim=-1)  # [..., D, K-1+T]
    kernel, length = weight.shape[-1], x.shape[-2]
    compute = at_least_float32(x.dtype)
    taps = weight[:, 0, :].to(compute)  # [D, K]
    shifted = window.to(compute)
    out = shifted[..., :length] * taps[:, :1]
    for j in range(1, kernel):
        out = out + shifted[..., j : j + length] * taps[:, j : j + 1]
    if bias is not None:
        out = out + bias.to(compute)[:, None]
    return out.transpose(-1, -2).to(x.dtype), window[..., -(kernel - 1) :]


class GatedRMSNorm(nn.Module):
    """``rmsnorm(y · silu(z))`` normalised per group of ``group_size`` channels."""

    def __init__(self, size: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        compute = at_least_float32(dtype)
        y = y.to(compute) * F.silu(z.to(compute))
        grouped = y.reshape(*y.shape[:-1], -1, self.group_size)
        grouped = grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * grouped.reshape(y.shape).to(dtype)


class Mamba2Mixer(nn.Module):
    """Nemotron-H's Mamba-2 mixer (checkpoint names ``in_proj``, ``conv1d``, ``dt_bias``, …)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        state_size: int,
        n_groups: int,
        conv_kernel: int,
        chunk_size: int,
        eps: float,
        use_conv_bias: bool = True,
        time_step_limit: tuple[float, float] = (0.0, float("inf")),
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.state_size = num_heads, head_dim, state_size
        self.n_groups, self.chunk_size = n_groups, chunk_size
        self.time_step_limit = time_step_limit
        self.inner = num_heads * head_dim
        self.conv_dim = self.inner + 2 * n_groups * state_size
        self.in_proj = nn.Linear(hidden_size, self.inner + self.conv_dim + num_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, bias=use_conv_bias
        )
        self.dt_bias = nn.Parameter(torch.zeros(num_heads))
        self.A_log = nn.Parameter(torch.zeros(num_heads))
        self.D = nn.Parameter(torch.ones(num_heads))
        self.norm = GatedRMSNorm(self.inner, self.inner // n_groups, eps)
        self.out_proj = nn.Linear(self.inner, hidden_size, bias=False)

    def initial_state(
        self, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero ``(conv_state [conv_dim, K-1], ssm_state [nh, hd, N] in at least float32)``."""
        dtype = self.in_proj.weight.dtype
        kernel = self.conv1d.weight.shape[-1]
        conv = torch.zeros(self.conv_dim, kernel - 1, dtype=dtype, device=device)
        ssm = torch.zeros(
            self.num_heads,
            self.head_dim,
            self.state_size,
            dtype=at_least_float32(dtype),
            device=device,
        )
        return conv, ssm

    def forward(
        self, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run ``hidden [T, H]`` from the given states; return ``(out, conv_state, ssm_state)``."""
        lead, length = hidden.shape[:-2], hidden.shape[-2]
        compute = at_least_float32(hidden.dtype)
        z, xbc, dt = torch.split(
            self.in_proj(hidden), [self.inner, self.conv_dim, self.num_heads], -1
        )
        xbc, conv_state = causal_conv1d(xbc, self.conv1d.weight, self.conv1d.bias, conv_state)
        xbc = F.silu(xbc)
        gn = self.n_groups * self.state_size
        x, b, c = torch.split(xbc, [self.inner, gn, gn], dim=-1)
        heads_per_group = self.num_heads // self.n_groups

        def per_head(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(*lead, length, self.n_groups, self.state_size).to(compute)
            return t.repeat_interleave(heads_per_group, dim=-2)

        dt = F.softplus(dt.to(compute) + self.dt_bias.to(compute)).clamp(*self.time_step_limit)
        a = -torch.exp(self.A_log.to(compute))
        x = x.reshape(*lead, length, self.num_heads, self.head_dim).to(compute)
        y, ssm_state = ssd_chunk_scan(
            x, dt, a, per_head(b), per_head(c), ssm_state.to(compute), self.chunk_size
        )
        y = y + self.D.to(compute)[:, None] * x
        y = self.norm(y.reshape(*lead, length, self.inner).to(hidden.dtype), z)
        return self.out_proj(y), conv_state, ssm_state
