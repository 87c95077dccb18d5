"""vLLM model class of the TwoTower checkpoint (context tower from vLLM's layers + denoiser)."""
