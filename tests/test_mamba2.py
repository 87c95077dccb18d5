"""Mamba-2: the chunked SSD scan equals the exact recurrence, with initial states."""

from __future__ import annotations

import pytest
import torch

from vllm_twotower.reference.mamba2 import (
    Mamba2Mixer,
    causal_conv1d,
    ssd_chunk_scan,
    ssd_sequential,
)


def _random_scan_inputs(length: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    nh, hd, n = 3, 4, 5
    x = torch.randn(length, nh, hd, generator=g, dtype=torch.float64)
    dt = torch.rand(length, nh, generator=g, dtype=torch.float64)
    a = -torch.rand(nh, generator=g, dtype=torch.float64) * 3
    b = torch.randn(length, nh, n, generator=g, dtype=torch.float64)
    c = torch.randn(length, nh, n, generator=g, dtype=torch.float64)
    h0 = 100 * torch.randn(nh, hd, n, generator=g, dtype=torch.float64)  # large seeded state
    return x, dt, a, b, c, h0


@pytest.mark.parametrize("length", [1, 7, 16, 33, 64])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_chunk_scan_matches_recurrence(length: int, chunk_size: int) -> None:
    x, dt, a, b, c, h0 = _random_scan_inputs(length, seed=length * 31 + chunk_size)
    y_ref, state_ref = ssd_sequential(x, dt, a, b, c, h0)
    y, state = ssd_chunk_scan(x, dt, a, b, c, h0, chunk_size)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(state, state_ref, rtol=1e-10, atol=1e-9)


def test_chunk_scan_continues_from_its_own_final_state() -> None:
    x, dt, a, b, c, h0 = _random_scan_inputs(40, seed=1)
    y_full, s_full = ssd_chunk_scan(x, dt, a, b, c, h0, 16)
    y1, s1 = ssd_chunk_scan(x[:23], dt[:23], a, b[:23], c[:23], h0, 16)
    y2, s2 = ssd_chunk_scan(x[23:], dt[23:], a, b[23:], c[23:], s1, 16)
    torch.testing.assert_close(torch.cat([y1, y2]), y_full, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(s2, s_full, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("length", [16, 40])  # one chunk (the denoiser's block), several
def test_batched_scan_and_conv_equal_each_row_alone(length: int) -> None:
    """The engine runs every row of a step through one call: leading batch dimensions."""
    rows = [_random_scan_inputs(length, seed=100 + r) for r in range(3)]
    x, dt, a, b, c, h0 = (torch.stack(parts) for parts in zip(*rows, strict=True))
    y, state = ssd_chunk_scan(x, dt, a[0], b, c, h0, 16)
    for r, (xr, dtr, _, br, cr, h0r) in enumerate(rows):  # A is per head, shared by rows
        y_r, state_r = ssd_chunk_scan(xr, dtr, a[0], br, cr, h0r, 16)
        torch.testing.assert_close(y[r], y_r, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(state[r], state_r, rtol=1e-12, atol=1e-10)
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(3, length, 6, generator=g)
    weight, bias = torch.randn(6, 1, 4, generator=g), torch.randn(6, generator=g)
    conv_states = torch.randn(3, 6, 3, generator=g)
    out, final = causal_conv1d(xs, weight, bias, conv_states)
    for r in range(3):
        out_r, final_r = causal_conv1d(xs[r], weight, bias, conv_states[r])
        torch.testing.assert_close(out[r], out_r)
        torch.testing.assert_close(final[r], final_r)


def test_causal_conv_state_continuation() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 6, generator=g)
    weight, bias = torch.randn(6, 1, 4, generator=g), torch.randn(6, generator=g)
    zero = torch.zeros(6, 3)
    full, state_full = causal_conv1d(x, weight, bias, zero)
    first, state = causal_conv1d(x[:5], weight, bias, zero)
    second, state = causal_conv1d(x[5:], weight, bias, state)
    torch.testing.assert_close(torch.cat([first, second]), full)
    torch.testing.assert_close(state, state_full)
    torch.testing.assert_close(state, x[-3:].t())
    # out[t] = bias + sum_j w[j] * x[t - 3 + j] (zeros before the start)
    padded = torch.cat([zero.t(), x])
    explicit = torch.stack(
        [bias + (weight[:, 0, :] * padded[t : t + 4].t()).sum(-1) for t in range(11)]
    )
    torch.testing.assert_close(full, explicit)


def test_mixer_split_run_equals_single_run() -> None:
    torch.manual_seed(0)
    mixer = Mamba2Mixer(32, 4, 8, 8, 2, 4, 16, 1e-5).double()
    with torch.no_grad():
        mixer.A_log.uniform_(0, 2)
        mixer.dt_bias.uniform_(-3, 0)
    hidden = torch.randn(21, 32, dtype=torch.float64)
    conv, ssm = mixer.initial_state()
    out, conv_full, ssm_full = mixer(hidden, conv, ssm.double())
    a, conv1, ssm1 = mixer(hidden[:9], conv, ssm.double())
    b, conv2, ssm2 = mixer(hidden[9:], conv1, ssm1)
    torch.testing.assert_close(torch.cat([a, b]), out)
    torch.testing.assert_close(ssm2, ssm_full)
    torch.testing.assert_close(conv2, conv_full)
