"""A fixed character-level tokenizer (plus one token per task template word) in Hugging Face form.

Why this design rather than a learned BPE:

* **No corpus needed.**  The vocabulary is a pure function of :data:`CHARSET` and the task
  template words, so a tiny random test checkpoint gets exactly the tokenizer the trained model
  uses, and rebuilding it never changes an id.
* **Digits and payload letters are single tokens.**  Arithmetic, copy, reverse, sort and count
  are then position-by-position problems a few-million-parameter model can learn; BPE merges
  inside random payloads would make them much harder.
* **Template words are single tokens** (``copy(``, ``def f(x,y):return `` …, from
  :data:`vllm_twotower.data.tasks.KEYWORDS`), registered as *added tokens* so they are matched
  before the character model runs.  They shorten prompts (training cost) and make the task id one
  token.  They hold lower-case letters, which payloads never contain, so they cannot split a
  payload differently from how the model saw it.
* **Exact round trip.**  The model is BPE with an empty merge list (every character is one
  token), no normalizer, no pre-tokenizer and a ``Fuse`` decoder that concatenates tokens, so
  ``decode(encode(text)) == text`` for any text over :data:`CHARSET`, spaces included.  Other
  characters map to ``<unk>``.

Ids: 0..4 are ``<pad> <bos> <eos> <mask> <unk>`` (mask id 3 as the TwoTower spec requires), then
the characters, then the template words; about 110 ids in all (see :func:`vocab_size`), so a
model ``vocab_size`` of 128 suffices.  Encoding with special tokens prepends ``<bos>``; EOS is
appended by :func:`encode_example` for training, and by nothing at serving time.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, processors

from vllm_twotower.data.specials import (
    BOS_ID,
    BOS_TOKEN,
    EOS_ID,
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    UNK_TOKEN,
)
from vllm_twotower.data.tasks import KEYWORDS, Example

#: Newline plus printable ASCII (space..tilde): any ASCII prompt a smoke test sends encodes.
CHARSET: str = "\n" + "".join(chr(c) for c in range(32, 127))
assert set(string.digits) <= set(CHARSET)
#: Upper bound on the vocabulary the rest of the stack may assume.
MAX_VOCAB = 1024
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def build_tokenizer(keywords: Sequence[str] = KEYWORDS) -> Tokenizer:
    """The tokenizer: specials at ids 0..4, one id per character, then one per keyword."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARSET))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(k, normalized=False) for k in keywords if k not in vocab])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    if tokenizer.get_vocab_size() > MAX_VOCAB:
        raise ValueError(f"vocabulary of {tokenizer.get_vocab_size()} exceeds {MAX_VOCAB}")
    return tokenizer


def vocab_size(tokenizer: Tokenizer | None = None) -> int:
    """Number of ids (including added tokens) of ``tokenizer`` (default: the built one)."""
    return (tokenizer or build_tokenizer()).get_vocab_size(with_added_tokens=True)


#: The chat template of the task checkpoints, so ``/v1/chat/completions`` works: ``<bos>``, then
#: every message's content in order, an assistant turn closed by ``<eos>``.  A one-message chat
#: renders exactly the prompt the model was trained on (``<bos>copy(ABC)=``), and the model
#: continues after the last message (``add_generation_prompt`` adds nothing: the task format
#: has no role markers).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


def _tokenizer_config(tokenizer: Tokenizer) -> dict[str, object]:
    """``tokenizer_config.json`` for ``transformers.PreTrainedTokenizerFast``.

    ``clean_up_tokenization_spaces`` must be off: transformers would otherwise rewrite
    ``" ,"`` to ``","`` on decode and break the exact round trip.
    """
    return {
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "mask_token": MASK_TOKEN,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "padding_side": "right",
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": {
            str(i): {
                "content": token,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for i, token in enumerate(SPECIAL_TOKENS)
            if tokenizer.token_to_id(token) == i
        },
    }


def _special_tokens_map() -> dict[str, str]:
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "mask_token": MASK_TOKEN,
    }


def save_tokenizer(directory: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write :data:`TOKENIZER_FILES` into ``directory`` (created) and return it.

    Only the ``tokenizers`` library and ``json`` are used, so the package needs no transformers;
    the result loads with ``AutoTokenizer.from_pretrained(directory)``.
    """
    tokenizer = tokenizer or build_tokenizer()
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    for name, content in (
        ("tokenizer_config.json", _tokenizer_config(tokenizer)),
        ("special_tokens_map.json", _special_tokens_map()),
    ):
        (path / name).write_text(json.dumps(content, indent=2) + "\n")
    return path


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The ``tokenizers`` object saved by :func:`save_tokenizer`."""
    return Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))


def encode_example(tokenizer: Tokenizer, example: Example) -> tuple[list[int], int]:
    """``(<bos> prompt answer <eos> ids, index of the first answer id)`` for training.

    Prompt and answer are encoded separately so the boundary is exact; because template words
    live only in prompts, this equals encoding ``prompt + answer`` in one go (tested), which is
    what a server sees when it tokenizes the prompt and the model continues it.
    """
    prompt_ids = tokenizer.encode(example.prompt).ids
    answer_ids = tokenizer.encode(example.answer, add_special_tokens=False).ids
    return [*prompt_ids, *answer_ids, EOS_ID], len(prompt_ids)
