"""lm-eval (``local-completions``) against the OpenAI server, on the test split, in every mode.

What a user evaluating a TwoTower server does: ``lm_eval --model local-completions`` with task
files over their data.  This writes two local tasks over the synthetic test split and runs
them against ``python -m vllm.entrypoints.openai.api_server`` on the embedded checkpoint:

* ``twotower_gen`` (``generate_until``, exact match): the answer generated after the prompt,
  in each mode (``vllm_xargs`` through lm-eval's ``gen_kwargs``);
* ``twotower_mc`` (``multiple_choice``, accuracy): the answer against three other answers of
  the same family, scored by log-likelihood.  lm-eval sends ``echo: true, logprobs: 1,
  max_tokens: 1`` and reads the prompt logprobs, which come from the context tower in every
  mode, so this task is scored once.

Beside each lm-eval figure it prints the same metric computed by the reference implementation
on the same documents (``reference_scores``), and writes both to ``docs/quality.md``.

    .venv/bin/python benchmarks/lm_eval_tasks.py               # 20 documents per family
    .venv/bin/python benchmarks/lm_eval_tasks.py --smoke       # 1 per family, a temp dir

lm-eval needs ``add_bos_token=True``: the checkpoint was trained with ``<bos>`` first and lm-eval
encodes without special tokens otherwise (``shared/spec/vllm-cpu.md``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from docsections import QUALITY, replace_section  # noqa: E402
from serve import free_port, server, server_flags  # noqa: E402

from vllm_twotower.checkpoints import DEFAULT_CHECKPOINT  # noqa: E402
from vllm_twotower.data import FAMILY_NAMES, Example, generate_split, is_correct  # noqa: E402
from vllm_twotower.params import AR, MASK_DIFFUSION, MOCK_AR  # noqa: E402
from vllm_twotower.reference import SamplingSpec, TwoTowerModel, generate  # noqa: E402

GEN_TASK, MC_TASK = "twotower_gen", "twotower_mc"
MODES = (AR, MASK_DIFFUSION, MOCK_AR)
MAX_GEN_TOKENS = 32
CHOICES = 4


def multiple_choice(examples: list[Example], seed: int) -> list[dict[str, Any]]:
    """Each example's answer among ``CHOICES - 1`` other answers of its family."""
    rng = random.Random(seed)
    by_family: dict[str, list[str]] = {}
    for example in examples:
        by_family.setdefault(example.family, []).append(example.answer)
    docs = []
    for example in examples:
        others = sorted(set(by_family[example.family]) - {example.answer})
        choices = [example.answer, *rng.sample(others, min(CHOICES - 1, len(others)))]
        rng.shuffle(choices)
        docs.append(
            {**example._asdict(), "choices": choices, "label": choices.index(example.answer)}
        )
    return docs


def write_tasks(out_dir: Path, examples: list[Example], seed: int) -> list[dict[str, Any]]:
    """Write both tasks' documents and lm-eval task files into ``out_dir``; return the MC docs."""
    mc_docs = multiple_choice(examples, seed)
    common = {
        "dataset_path": "json",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "target_delimiter": "",  # the answer follows the prompt directly (`2+3=` → `5`)
    }
    tasks = {
        GEN_TASK: (
            [e._asdict() for e in examples],
            {
                "output_type": "generate_until",
                "doc_to_target": "{{answer}}",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_GEN_TOKENS},
                "metric_list": [{"metric": "exact_match"}],
            },
        ),
        MC_TASK: (
            mc_docs,
            {
                "output_type": "multiple_choice",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}",
                "metric_list": [{"metric": "acc"}],
            },
        ),
    }
    for name, (docs, config) in tasks.items():
        data = out_dir / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        task = {"task": name, **common, **config}
        task["dataset_kwargs"] = {"data_files": {"test": str(data)}}
        (out_dir / f"{name}.yaml").write_text(json.dumps(task, indent=2))  # YAML ⊃ JSON
    return mc_docs


def run_lm_eval(
    task_dir: Path, base_url: str, checkpoint: Path, task: str, mode: str | None
) -> float:
    """One lm-eval task against the server; its main metric."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = (
        f"model={checkpoint},base_url={base_url}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={checkpoint},add_bos_token=True,num_concurrent=4,max_retries=1,"
        "tokenized_requests=True"
    )
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=[task],
        task_manager=TaskManager(include_path=str(task_dir)),
        gen_kwargs={"vllm_xargs": {"mode": mode}} if mode else None,
        log_samples=False,
    )
    metrics = results["results"][task]
    return float(metrics["exact_match,none" if task == GEN_TASK else "acc,none"])


def reference_scores(
    model: TwoTowerModel, tokenizer: Any, examples: list[Example], mc_docs: list[dict[str, Any]]
) -> dict[str, float]:
    """The same metrics from the reference: exact match per mode, MC by log-likelihood."""
    from vllm_twotower.params import TwoTowerParams

    defaults = model.config.diffusion
    prompts = [tokenizer.encode(e.prompt).ids for e in examples]
    scores = {}
    for mode in MODES:
        params = TwoTowerParams(
            mode, defaults.block_size, defaults.steps_per_block, defaults.confidence_threshold
        )
        results = generate(
            model, prompts, [params] * len(prompts), [SamplingSpec(MAX_GEN_TOKENS)] * len(prompts)
        )
        texts = [tokenizer.decode(r.output_ids) for r in results]
        scores[mode] = sum(map(is_correct, examples, texts)) / len(examples)
    hits = 0
    for doc, prompt in zip(mc_docs, prompts, strict=True):
        scored = []
        for choice in doc["choices"]:
            answer = tokenizer.encode(choice, add_special_tokens=False).ids
            ids = torch.tensor(prompt + answer)
            logits, _ = model.extend_context(ids, model.empty_context())
            logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
            scored.append(float(logprobs[torch.arange(len(answer)), ids[len(prompt) :]].sum()))
        hits += max(range(len(scored)), key=scored.__getitem__) == doc["label"]
    scores["mc"] = hits / len(mc_docs)
    return scores


def evaluate_server(
    checkpoint: Path, n_per_family: int, seed: int, work: Path
) -> tuple[dict[str, float], dict[str, float]]:
    """``(lm-eval's scores, the reference's)`` keyed by mode and ``"mc"``."""
    from vllm_twotower.data import load_tokenizer

    examples = generate_split("test", n_per_family * len(FAMILY_NAMES), seed)
    mc_docs = write_tasks(work, examples, seed)
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
           "--host", "127.0.0.1", "--port", str(port), *server_flags()]  # fmt: skip
    expected: dict[str, float] = {}

    def meanwhile() -> None:
        tokenizer = load_tokenizer(checkpoint)
        expected.update(
            reference_scores(
                TwoTowerModel.from_pretrained(checkpoint), tokenizer, examples, mc_docs
            )
        )

    base = f"http://127.0.0.1:{port}"
    with server(cmd, port, work / "server.log", meanwhile):
        got = {mode: run_lm_eval(work, base, checkpoint, GEN_TASK, mode) for mode in MODES}
        got["mc"] = run_lm_eval(work, base, checkpoint, MC_TASK, None)
    return got, expected


def markdown(got: dict[str, float], expected: dict[str, float], n_per_family: int) -> str:
    labels = {m: f"`{GEN_TASK}` exact match, `{m}`" for m in MODES}
    labels["mc"] = f"`{MC_TASK}` accuracy (any mode)"
    rows = [f"| {label} | {100 * got[k]:.1f} % | {100 * expected[k]:.1f} % |"
            for k, label in labels.items()]  # fmt: skip
    return "\n".join([
        f"`.venv/bin/python benchmarks/lm_eval_tasks.py` (lm-eval 0.4.13, `local-completions`, "
        f"{n_per_family} test-split documents per family, {len(FAMILY_NAMES)} families; the "
        "server's default γ). The reference column scores the same documents with the "
        "reference implementation.",
        "",
        "| task | lm-eval via the server | reference |",
        "|---|---|---|",
        *rows,
        "",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--n-per-family", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="1 document per family, no docs/")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        args.n_per_family = 1
    work = Path(tempfile.mkdtemp(prefix="lm_eval_tasks_"))
    got, expected = evaluate_server(args.checkpoint, args.n_per_family, args.seed, work)
    section = markdown(got, expected, args.n_per_family)
    print(section)
    if not args.smoke:
        replace_section("lm-eval", section, QUALITY)


if __name__ == "__main__":
    main()
