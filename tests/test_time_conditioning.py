"""adaLN-single time conditioning: embedding formula and per-layer-type modulation order."""

from __future__ import annotations

import math

import torch

from vllm_twotower.config import ATTENTION, MAMBA, MOE
from vllm_twotower.reference.blocks import Block
from vllm_twotower.reference.model import TwoTowerModel, timestep_embedding
from vllm_twotower.tools.make_tiny import tiny_config


def test_timestep_embedding_formula() -> None:
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = timestep_embedding(t)
    assert emb.shape == (3, 256)
    for row, tv in enumerate(t.tolist()):
        for i in (0, 1, 17, 127):
            freq = math.exp(-math.log(10000.0) * i / 128)
            assert math.isclose(emb[row, i].item(), math.cos(tv * 1000 * freq), abs_tol=1e-4)
            assert math.isclose(emb[row, 128 + i].item(), math.sin(tv * 1000 * freq), abs_tol=1e-4)


def test_time_modulation_is_table_plus_projected_embedding() -> None:
    torch.manual_seed(0)
    model = TwoTowerModel(tiny_config())
    for table in model.scale_shift_tables:
        torch.nn.init.normal_(table)
    t = 0.375
    mod = model.time_modulation(t)
    t_emb = model.t_block[1](torch.nn.functional.silu(model.t_embedder(torch.tensor([t]))))
    expected = torch.stack(list(model.scale_shift_tables)) + t_emb.view(1, 3, -1)
    torch.testing.assert_close(mod, expected)
    assert mod.shape == (len(model.config.pattern), 3, model.config.hidden_size)


def test_block_modulation_order_per_layer_type() -> None:
    torch.manual_seed(0)
    config = tiny_config()
    x = torch.randn(5, config.hidden_size)
    shift, scale, gate = torch.randn(3, config.hidden_size)
    mod = torch.stack([shift, scale, gate])
    for symbol in (MAMBA, ATTENTION, MOE):
        block = Block(config, symbol)
        torch.nn.init.normal_(block.norm.weight)
        cache = block.empty_cache()
        out, _ = block(x, cache, causal=False, modulation=mod)
        if symbol in (MAMBA, ATTENTION):
            h = block.norm(x * (1 + scale) + shift)  # modulate, then norm
        else:
            h = block.norm(x) * (1 + scale) + shift  # norm, then modulate
        mixed = (
            block.mixer(h, *cache)[0]
            if symbol == MAMBA
            else (
                block.mixer(h, *cache, causal=False)[0] if symbol == ATTENTION else block.mixer(h)
            )
        )
        torch.testing.assert_close(out, x + gate * mixed)
