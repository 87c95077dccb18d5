"""lm-eval's ``local-completions`` against the real server agrees with the reference (slow).

Two documents per family of the test split, on the embedded checkpoint: the generation task's
exact match in every mode, and the multiple-choice task's accuracy (log-likelihood through
``echo`` + ``logprobs``), must equal the reference implementation's on the same documents.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vllm_twotower.checkpoints import DEFAULT_CHECKPOINT

pytestmark = pytest.mark.slow
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_lm_eval_scores_equal_the_reference(tmp_path: Path) -> None:
    from lm_eval_tasks import MODES, evaluate_server

    got, expected = evaluate_server(DEFAULT_CHECKPOINT, n_per_family=2, seed=3, work=tmp_path)
    assert set(got) == {*MODES, "mc"}
    assert got == expected
    assert expected["ar"] > 0.5 and expected["mc"] > 0.5  # the trained checkpoint, not noise
