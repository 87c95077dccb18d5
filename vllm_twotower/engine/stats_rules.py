"""What a request's denoiser counters must be, given what it generated.

The counters (``RequestTable``) are kept by the runner step by step; the output is cut by the
scheduler (EOS, ``max_tokens``, ``max_model_len``).  These rules tie the two together, so a test
or a soak can check every request it sent against the tokens it got back:

* ``ar``: the denoiser never runs: no passes, blocks or denoised tokens;
* ``mock_ar``: one pass per token, which decides that token;
* ``mask_diffusion``: one block per started ``block_size`` tokens (the last one may be cut),
  every block fully decided, between one pass and ``min(steps_per_block, block_size)`` passes
  per block (each pass decides at least one position);
* ``speculative``: every draft fully decided (``c`` given unless it is the mask id),
  between one pass and ``min(steps_per_block, block_size)`` passes per draft, at most
  ``block_size - 1`` guesses accepted per draft; a drafting step emits ``c``, its ``k``
  accepted guesses and the AR token after them, a step that skipped the draft under load
  ``c`` alone, so ``tokens <= 2 * blocks + accepted + ar_steps``, and, since only the last
  step may be cut (EOS, ``max_tokens``) and keeps at least one token, ``tokens >= 2 * blocks
  + accepted + ar_steps - block_size``;
* ``auto``: as ``mask_diffusion`` for its blocks, plus one token per AR step:
  ``blocks * block_size + ar_steps`` tokens at most, and at least that less what a cut last
  step dropped (``block_size - 1`` after a block, nothing after an AR token);
* ``auto`` and ``speculative``: the schedule has one entry per step, as many blocks (drafts)
  and AR steps as the counters.

A request the frontend cut (a stop string, a client gone) may have run a step or two more than
it returned, so for it only lower bounds hold (``cut_early``).
"""

from __future__ import annotations

from collections.abc import Mapping


def stats_mismatches(
    entry: Mapping[str, object],
    *,
    tokens: int,
    block_size: int,
    steps_per_block: int,
    cut_early: bool = False,
) -> list[str]:
    """The rules ``entry`` (one request's stats) breaks, as readable lines; empty if none."""
    mode, nfe, blocks, decided = (entry[k] for k in ("mode", "nfe", "blocks", "denoised_tokens"))
    assert isinstance(nfe, int) and isinstance(blocks, int) and isinstance(decided, int)
    errors = []

    def require(ok: bool, what: str) -> None:
        if not ok:
            errors.append(f"{mode}: {what} (nfe={nfe}, blocks={blocks}, denoised={decided}, "
                          f"tokens={tokens}, block_size={block_size})")  # fmt: skip

    def equal_or_more(got: int, expected: int, what: str) -> None:
        require(got >= expected if cut_early else got == expected, f"{what} should be {expected}")

    if mode == "ar":
        require(nfe == blocks == decided == 0, "ar should not run the denoiser")
    elif mode == "mock_ar":
        require(blocks == 0, "mock_ar denoises no blocks")
        equal_or_more(nfe, tokens, "passes")
        require(decided == nfe, "each mock_ar pass decides one token")
    elif mode == "mask_diffusion":
        equal_or_more(blocks, -(-tokens // block_size), "blocks")
        require(decided == blocks * block_size, "every block is fully decided")
        require(
            blocks <= nfe <= blocks * min(steps_per_block, block_size),
            "passes should be between 1 and min(steps_per_block, block_size) per block",
        )
    elif mode == "auto":
        ar_steps, schedule = entry["ar_steps"], entry["schedule"]
        assert isinstance(ar_steps, int) and isinstance(schedule, str)
        require(decided == blocks * block_size, "every block is fully decided")
        require(
            blocks <= nfe <= blocks * min(steps_per_block, block_size),
            "passes should be between 1 and min(steps_per_block, block_size) per block",
        )
        require(
            schedule.count("d") == blocks and schedule.count("a") == ar_steps,
            f"the schedule {schedule!r} should count the blocks and AR steps",
        )
        emitted = blocks * block_size + ar_steps
        require(tokens <= emitted, "more tokens than the steps emitted")
        if not cut_early:
            dropped = block_size - 1 if schedule.endswith("d") else 0
            require(tokens >= emitted - dropped, "the steps emitted more than the last cut")
    elif mode == "speculative":
        accepted = entry["accepted_tokens"]
        assert isinstance(accepted, int)
        # c is given, except where it is the mask id: the commit rule then fills it too.
        require(
            blocks * (block_size - 1) <= decided <= blocks * block_size,
            "every draft is fully decided after c",
        )
        # A one-token draft is c alone: decided before any pass.
        require(
            blocks * (block_size > 1) <= nfe <= blocks * min(steps_per_block, block_size),
            "passes should be between 1 (0 for one-token drafts) and "
            "min(steps_per_block, block_size) per draft",
        )
        require(accepted <= blocks * (block_size - 1), "at most block_size - 1 guesses per draft")
        ar_steps, schedule = entry["ar_steps"], entry["schedule"]
        assert isinstance(ar_steps, int) and isinstance(schedule, str)
        require(
            schedule.count("s") == blocks and schedule.count("a") == ar_steps,
            f"the schedule {schedule!r} should count the drafts and AR steps",
        )
        # c, the accepted guesses and one AR token per drafting step; c per AR step.
        emitted = 2 * blocks + accepted + ar_steps
        require(tokens <= emitted, "more tokens than the steps emitted")
        if not cut_early:
            require(tokens >= emitted - block_size, "the steps emitted more than the last cut")
    else:
        errors.append(f"unknown mode {mode!r}")
    return errors
