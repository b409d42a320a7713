"""The running batch's tensors on the device: inputs, attention mask, key/value cache, and the
per-row sampling and penalty state. The rows themselves (text, requests) are the engine's; every
method that changes the rows takes them, in the batch's row order.

Rows are left-padded so that every row's newest token sits in the last column; the attention mask
hides the padding and each row carries its own position. Rows join by `concatenate` (padding the
shorter key/value cache on the left) and leave by `filter` (which also drops padding columns no
row needs any more), so memory follows the rows that are really there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from app.engine.request import TokenLogprob
from app.engine.sampling import SamplingTensors, token_logprobs


class _ReservedLayer(DynamicLayer):
    """One layer's key/value cache with room reserved for the tokens its rows will still generate.

    transformers' DynamicLayer grows by `torch.cat` at every step, copying the whole cache each
    time; this layer writes each step's keys and values in place and exposes views of the filled part.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        rows, heads, length, head_dim = keys.shape
        self._keys = keys.new_empty((rows, heads, max(capacity, length), head_dim))
        self._values = values.new_empty((rows, heads, max(capacity, length), values.shape[-1]))
        self._keys[:, :, :length] = keys
        self._values[:, :, :length] = values
        self.length = length
        self.device = keys.device
        self.is_initialized = True
        self._expose()

    def _expose(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:  # more than reserved (not expected): grow, like DynamicLayer
            self._keys = torch.cat([self._keys[:, :, : self.length], key_states], dim=-2)
            self._values = torch.cat([self._values[:, :, : self.length], value_states], dim=-2)
        else:
            self._keys[:, :, self.length:end] = key_states
            self._values[:, :, self.length:end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values


def _reserved_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], capacity: int) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [_ReservedLayer(keys, values, capacity) for keys, values in layers]
    return cache


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


class Batch:
    def __init__(self, rows, next_tokens, attention_mask, layers, vocab_size):
        """`rows`: objects with `params`, `prompt_ids`, `generated` and `steps_left` (read, not kept)."""
        self.rows = len(rows)
        self.next_tokens: torch.Tensor = next_tokens  # [B] the tokens to feed at the next step
        self.attention_mask: torch.Tensor = attention_mask  # [B, L] over the cached columns
        # Rows are right-aligned, so the cache needs L columns plus the most steps any row has left.
        steps_left = max(row.steps_left + 1 for row in rows)
        self.cache: DynamicCache = _reserved_cache(layers, attention_mask.shape[1] + steps_left)
        self.vocab_size = vocab_size
        self.sampling = SamplingTensors.build([row.params for row in rows], attention_mask.device, vocab_size)
        self.seen: torch.Tensor | None = None  # [B, V] bool: prompt and output tokens (repetition penalty)
        self.output_counts: torch.Tensor | None = None  # [B, V] int: output tokens (presence/frequency)
        if self.sampling.use_repetition or self.sampling.use_presence_frequency:
            self._build_penalty_state(rows)

    def __len__(self) -> int:
        return self.rows

    @property
    def device(self) -> torch.device:
        return self.attention_mask.device

    @property
    def padded_length(self) -> int:
        return self.attention_mask.shape[1]

    # ---- building -------------------------------------------------------------------------------

    @classmethod
    @torch.inference_mode()
    def prefill(cls, model, rows: list, vocab_size: int, want_prompt_logprobs: list[int | None]):
        """Run the prompts of new requests through the model once.

        `rows` holds each request's rows consecutively (each with its `handle`); rows of one request
        share its prefill.
        `want_prompt_logprobs[i]` is None, or the number of alternatives for request i's prompt tokens.
        Returns the new batch, the logits for each row's first token, and prompt log-probabilities.
        """
        device = model.device
        handles = list(dict.fromkeys(row.handle for row in rows))
        prompts = [h.request.prompt_ids for h in handles]
        width = max(len(p) for p in prompts)
        input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        any_prompt_logprobs = any(k is not None for k in want_prompt_logprobs)
        cache = DynamicCache()
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
            use_cache=True, logits_to_keep=0 if any_prompt_logprobs else 1,
        )
        prompt_logprobs = [
            None if k is None else _prompt_logprobs(out.logits[i], prompts[i], k)
            for i, k in enumerate(want_prompt_logprobs)
        ]
        batch, last_logits = cls._from_prompts(rows, handles, cache, out.logits[:, -1, :], attention_mask, vocab_size)
        return batch, last_logits, prompt_logprobs

    @classmethod
    def _from_prompts(cls, rows, handles, cache, last_logits, attention_mask, vocab_size):
        """The batch of prefilled prompts, one row per sequence: rows of a request with n > 1 share
        its prompt's cache."""
        if len(rows) != len(handles):
            index = torch.tensor([handles.index(row.handle) for row in rows], device=last_logits.device)
            cache.batch_select_indices(index)
            last_logits = last_logits[index]
            attention_mask = attention_mask[index]
        empty = torch.empty(0, dtype=torch.long, device=last_logits.device)
        return cls(rows, empty, attention_mask, _layers(cache), vocab_size), last_logits

    @classmethod
    def concatenate(cls, batches: list["Batch | None"], rows: list) -> "Batch | None":
        """Merge batches, left-padding the shorter ones' caches and masks to the longest; `rows` are
        the merged batch's rows."""
        batches = [b for b in batches if b is not None and len(b)]
        if len(batches) <= 1:  # none left when every new row finished on its first token
            return batches[0] if batches else None
        width = max(b.padded_length for b in batches)
        masks = [F.pad(b.attention_mask, (width - b.padded_length, 0)) for b in batches]
        layers = []
        for per_batch in zip(*(_layers(b.cache) for b in batches)):
            keys = torch.cat([F.pad(k, (0, 0, width - k.shape[-2], 0)) for k, _ in per_batch])
            values = torch.cat([F.pad(v, (0, 0, width - v.shape[-2], 0)) for _, v in per_batch])
            layers.append((keys, values))
        merged = cls(
            rows,
            torch.cat([b.next_tokens for b in batches]),
            torch.cat(masks),
            layers,
            batches[0].vocab_size,
        )
        return merged

    def filter(self, keep: list[int], rows: list) -> "Batch | None":
        """Keep only the rows at `keep` (`rows` are those kept); free everything else, padding
        columns included."""
        if not keep:
            return None
        if len(keep) == len(self):
            return self
        index = torch.tensor(keep, device=self.device)
        mask = self.attention_mask[index]
        # Columns that are padding for every remaining row are dropped.
        first_used = int(mask.any(dim=0).nonzero()[0])
        mask = mask[:, first_used:]
        layers = [(k[index, :, first_used:], v[index, :, first_used:]) for k, v in _layers(self.cache)]
        kept = Batch(rows, self.next_tokens[index], mask, layers, self.vocab_size)
        return kept

    def _build_penalty_state(self, rows) -> None:
        self.seen = torch.zeros((len(rows), self.vocab_size), dtype=torch.bool, device=self.device)
        self.output_counts = torch.zeros((len(rows), self.vocab_size), dtype=torch.int32, device=self.device)
        for i, row in enumerate(rows):
            self.seen[i, list(row.prompt_ids)] = True
            if row.generated:
                ids = torch.tensor(row.generated, device=self.device)
                self.seen[i, ids] = True
                self.output_counts[i].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))

    # ---- stepping -------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, model) -> torch.Tensor:
        """One decoding step for every row; returns the next-token logits [B, V]."""
        self.attention_mask = F.pad(self.attention_mask, (0, 1), value=1)
        positions = self.attention_mask.sum(dim=-1, keepdim=True) - 1
        out = model(
            input_ids=self.next_tokens.unsqueeze(1), attention_mask=self.attention_mask, position_ids=positions,
            cache=self.cache, use_cache=True,
        )
        return out.logits[:, -1, :]

    def record(self, tokens: torch.Tensor) -> None:
        """The tokens just chosen become the next step's input and count for the penalties."""
        self.next_tokens = tokens
        if self.output_counts is not None:
            column = tokens.unsqueeze(1)
            self.output_counts.scatter_add_(1, column, torch.ones_like(column, dtype=torch.int32))
            self.seen.scatter_(1, column, True)


class ChunkedPrefill:
    """One request's prompt run through the model a chunk at a time, between decoding steps, so that
    the rows already running keep their pace while a long prompt arrives."""

    def __init__(self, rows: list, want_prompt_logprobs: int | None):
        self.rows = rows  # the request's rows, which join the batch once the prompt is done
        self.handle = rows[0].handle
        self.prompt = self.handle.request.prompt_ids
        self.done = 0  # prompt tokens already in the cache
        self._want = want_prompt_logprobs
        self.prompt_logprobs = [None] if want_prompt_logprobs is not None else None
        self._cache = DynamicCache()

    @torch.inference_mode()
    def advance(self, model, chunk: int, vocab_size: int):
        """Run up to `chunk` more prompt tokens. Once the prompt is complete, return the new batch
        and the logits of each row's first token (as `Batch.prefill` does); before that, None."""
        device = model.device
        end = min(self.done + chunk, len(self.prompt))
        out = model(
            input_ids=torch.tensor([self.prompt[self.done:end]], device=device),
            attention_mask=torch.ones((1, end), dtype=torch.long, device=device),
            position_ids=torch.arange(self.done, end, device=device).unsqueeze(0),
            cache=self._cache, use_cache=True, logits_to_keep=0 if self._want is not None else 1,
        )
        if self._want is not None:  # position i predicts prompt token i + 1
            targets = self.prompt[self.done + 1:end + 1]
            predicting = out.logits[0, : len(targets)]
            self.prompt_logprobs += token_logprobs(predicting, torch.tensor(targets, device=device), self._want)
        self.done = end
        if end < len(self.prompt):
            return None
        mask = torch.ones((1, len(self.prompt)), dtype=torch.long, device=device)
        return Batch._from_prompts(self.rows, [self.handle], self._cache, out.logits[:, -1, :], mask, vocab_size)


def _prompt_logprobs(logits: torch.Tensor, prompt: tuple[int, ...], top: int) -> list[TokenLogprob | None]:
    """Log-probability of each prompt token given the ones before it (the first has none)."""
    if len(prompt) < 2:
        return [None] * len(prompt)
    # This row is left-padded: its prompt occupies the last len(prompt) positions.
    predicting = logits[-len(prompt):-1]
    targets = torch.tensor(prompt[1:], device=logits.device)
    return [None, *token_logprobs(predicting, targets, top)]
