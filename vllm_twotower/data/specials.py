"""Special tokens shared by the task generator (which must recognise EOS in generated text) and
the tokenizer (which must place them at fixed ids).

The ids follow the TwoTower spec (``shared/spec/twotower-model.md``): pad 0, bos 1, eos 2 and the
diffusion mask id 3, which the engine uses as an API default rather than a config field, so every
tokenizer we ship must agree with it.  ``<unk>`` (id 4) is ours: it catches characters outside the
fixed character set instead of silently dropping them.
"""

from __future__ import annotations

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
MASK_TOKEN = "<mask>"
UNK_TOKEN = "<unk>"

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
MASK_ID = 3
UNK_ID = 4

#: Special tokens in id order; position ``i`` in this tuple is token id ``i``.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, UNK_TOKEN)
