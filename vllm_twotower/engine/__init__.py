"""The TwoTower engine inside vLLM: config hook, worker, model runner, request parameters."""
