"""Training the small TwoTower model of the embedded checkpoint, the TwoTower way.

``python -m vllm_twotower.train --out DIR --seed 0`` runs two stages (spec §6):

1. **Context tower** = an AR language model on ``<bos> prompt answer <eos>`` with
   ``context_lm_head``; the loss covers the answer and its ``<eos>`` only (prompts are random
   payloads: nothing to learn there, see :func:`~vllm_twotower.train.batching.ar_batch`).
2. **Denoiser** = a copy of the trained context tower (heads too) with identity-initialised time
   conditioning, trained with the MDLM objective while the context tower is frozen: per block
   ``t ~ U[1e-3, 1]``, each position masked with probability ``t``; the denoiser sees the
   context tower's KV of every earlier position (joint attention, no mask in the block) and its
   Mamba conv/SSM states at the block boundary, is conditioned on the block's *actual* masked
   fraction (``t = #masked / S``, what inference computes before each step), and is scored by
   the mean cross-entropy on masked positions against the clean token at the same position,
   with the mask id's logit excluded (inference suppresses it).

Where blocks start, and why: at inference the prompt is always clean context and the first
diffusion block begins right after it, at an arbitrary (not 16-aligned) position.  Training
therefore cuts blocks from the answer start — the prompt is never masked, it is context — and
pads the answer with ``<eos>`` to whole blocks, because a served block is always denoised in
full and the positions after the answer are cut at the first EOS.  Block ``n`` sees the prompt
plus clean answer blocks ``0..n-1`` as context.  Block size = Mamba chunk size = 16.  Batches
group equal prefix lengths, so the batched training pass is exactly the per-request inference
pass (``tests/test_train.py`` checks it row by row against ``TwoTowerModel.denoise``).
"""

from vllm_twotower.train.trainer import TrainSettings, long_config, tasks_config, train

__all__ = ["TrainSettings", "long_config", "tasks_config", "train"]
