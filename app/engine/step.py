"""One decoding step's decisions: from the batch's next-token logits to one `Delta` per row.

In order: penalties and the end-of-text ban (minimum tokens, `ignore_eos`), the choice of each
row's token, log-probabilities, then incremental detokenization and stop strings. The batch's
tensors are updated with the chosen tokens; which rows leave is for the caller to act on.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import torch

from app.engine.profiling import section
from app.engine.request import Delta, RequestHandle, SamplingParams, TokenLogprob
from app.engine.sampling import apply_penalties, choose_tokens, token_logprobs
from app.engine.text import IncrementalDecoder, StopStringFilter


@dataclass(eq=False)
class Row:
    """One generated sequence (a request with n > 1 has n of them) and its text state."""

    handle: RequestHandle
    index: int
    decoder: IncrementalDecoder
    stops: StopStringFilter
    rng: random.Random
    generated: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, handle: RequestHandle, index: int, tokenizer) -> "Row":
        request = handle.request
        return cls(handle, index, IncrementalDecoder(tokenizer, request.prompt_ids), StopStringFilter(request.stop),
                   row_rng(request.sampling.seed, index))

    @property
    def params(self) -> SamplingParams:
        return self.handle.request.sampling

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.handle.request.prompt_ids

    @property
    def max_total_tokens(self) -> int:
        return self.handle.request.max_total_tokens

    @property
    def steps_left(self) -> int:
        return self.handle.request.max_new_tokens - len(self.generated)

    @property
    def eos_banned(self) -> bool:
        request = self.handle.request
        return request.ignore_eos or len(self.generated) < request.min_new_tokens


def row_rng(seed: int | None, index: int) -> random.Random:
    """Each row draws from its own generator: a seeded request repeats whatever else is running."""
    if seed is None:
        return random.Random(int.from_bytes(os.urandom(8), "little"))
    return random.Random(f"{seed}:{index}")


def step(logits: torch.Tensor, batch, rows: list[Row], eos_id: int | None) -> list[Delta]:
    """Choose every row's next token from `logits` [B, V], record it in `batch`, and return the
    rows' deltas in row order; a delta with `finish_reason` set is its row's last."""
    logits = logits.float()  # a no-op for float32 models
    wanted = [row.handle.request.logprobs for row in rows]
    top = max((k for k in wanted if k is not None), default=None)
    with section("penalties"):
        scored = apply_penalties(logits, batch.sampling, batch.seen, batch.output_counts)
        banned = [i for i, row in enumerate(rows) if row.eos_banned] if eos_id is not None else []
        if banned:
            if scored is logits and top is not None:  # the raw logits are still needed for log-probabilities
                scored = scored.clone()
            scored[banned, eos_id] = float("-inf")
    with section("sampling"):
        uniforms = torch.tensor([row.rng.random() for row in rows], device=logits.device)
        tokens = choose_tokens(scored, batch.sampling, uniforms)
    with section("logprobs"):
        logprobs = token_logprobs(logits, tokens, top) if top is not None else None
    with section("bookkeeping"):
        batch.record(tokens)
        token_ids = tokens.tolist()
    with section("detokenize"):
        return [
            _row_delta(row, token, None if logprobs is None or k is None else logprobs[i], k, eos_id)
            for i, (row, token, k) in enumerate(zip(rows, token_ids, wanted))
        ]


def _row_delta(row: Row, token: int, logprob: TokenLogprob | None, k: int | None, eos_id: int | None) -> Delta:
    request = row.handle.request
    if row.handle.cancelled:
        return Delta(row.index, "", [], None, "cancelled")
    row.generated.append(token)
    token_lp = None if logprob is None else [TokenLogprob(logprob.token_id, logprob.logprob, logprob.top[:k])]
    hit_eos = token == eos_id and not request.ignore_eos
    text, hit_stop = ("", False) if hit_eos else row.stops.push(row.decoder.push(token))
    finish = None
    if hit_stop or hit_eos:
        finish = "stop"
    elif len(row.generated) >= request.max_new_tokens:
        finish = "length"
    if finish and not hit_stop:  # the end: release whatever was held back
        text += row.stops.push(row.decoder.flush())[0] + row.stops.flush()
    return Delta(row.index, text, [token], token_lp, finish)
