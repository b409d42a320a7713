"""The running batch's tensors on the device: inputs, attention mask, key/value cache, and the
per-row sampling and penalty state. The rows themselves (text, requests) are the engine's; every
method that changes the rows takes them, in the batch's row order.

The key/value cache lives in storage that outlives the batch's changes, one [slots, heads, columns,
head_dim] tensor pair per layer. The running rows fill slots 0..rows-1; the model attends over a
window of columns that ends at every row's newest token (rows are right-aligned, so a row shorter
than the window has padding on its left, hidden by the attention mask and skipped by its position
ids; GPT-Neo's local attention counts its window back from the last column, so right alignment
is what keeps it exact). Each step writes one column for every row.

So a row joining copies only its own prompt's keys and values into free slots, and a row leaving
moves at most one other row (the last) into its slot. The storage has as many columns as the longest
row can ever take (its prompt and every token it may generate), not the window plus the longest
row's steps left: a row joining late adds no columns for the old rows' history, which leaves the
window as the old rows finish. It is re-laid out only when it runs out of slots or columns (then it
grows, or the window shifts back to column 0 once the old rows' columns have left it), and it is
freed when the batch empties.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from app.allocator import release_free_memory
from app.engine.prefill import run_prompts
from app.engine.request import TokenLogprob
from app.engine.sampling import SamplingTensors, token_logprobs

# Storage rows (slots) and columns come in multiples of these: a batch growing by a row or two, or a
# longer request joining, rarely needs new storage, and little of it sits unused (the storage is the
# largest thing the server allocates while it serves: GPT-2 small at 16 rows of 166 tokens, 196 MB in
# float32; with a quarter more slots and columns in 32s, it was 283 MB).
SLOT_QUANTUM = 4
COLUMN_QUANTUM = 8


class _SlotLayer(DynamicLayer):
    """One layer's keys and values: storage [slots, heads, columns, head_dim] and the view of it
    the model sees, rows 0..rows-1 and columns lo..end-1. `update` writes a step's keys and values
    at column `end` in place (the batch makes sure there is room) instead of concatenating."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        # A prefilled group's own tensors serve as its storage until it needs room to decode.
        self.key_store, self.value_store = keys, values
        self.rows, self.lo, self.end = keys.shape[0], 0, keys.shape[-2]
        self.device = keys.device
        self.is_initialized = True
        self._expose()

    @property
    def slots(self) -> int:
        return self.key_store.shape[0]

    @property
    def columns(self) -> int:
        return self.key_store.shape[-2]

    def _expose(self) -> None:
        self.keys = self.key_store[: self.rows, :, self.lo:self.end]
        self.values = self.value_store[: self.rows, :, self.lo:self.end]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.end + key_states.shape[-2]
        if end > self.columns:
            raise RuntimeError("key/value storage has no room for this step")  # Batch.forward makes room
        self.key_store[: self.rows, :, self.end:end] = key_states
        self.value_store[: self.rows, :, self.end:end] = value_states
        self.end = end
        self._expose()
        return self.keys, self.values

    def lay_out(self, rows_needed: int, width: int, columns: int) -> bool:
        """Make room for `rows_needed` rows and a window of `width` columns (the current rows
        right-aligned in it) followed by free columns up to `columns` in all. Nothing moves when
        the window can grow to the left in place; the window shifts back to column 0 when the
        storage has room but not after the window; new storage (rows and columns rounded up to
        SLOT_QUANTUM and COLUMN_QUANTUM) is allocated only when it is too small, or four times too large,
        in rows. Returns whether it was (the old storage is then free)."""
        slots_fit = rows_needed <= self.slots <= max(4 * rows_needed, 8)
        if slots_fit and width <= self.end and self.end + columns - width <= self.columns:
            self.lo = self.end - width
            self._expose()
            return False
        old_width = self.end - self.lo
        in_place = slots_fit and columns <= self.columns
        slots = self.slots if slots_fit else _round_up(rows_needed, SLOT_QUANTUM)
        for name in ("key_store", "value_store"):
            store = getattr(self, name)
            current = store[: self.rows, :, self.lo:self.end]
            if in_place:
                target, current = store, current.clone()  # the old and new windows may overlap
            else:
                # Zeros, not empty: padding columns are masked, but garbage NaN would still leak
                # through the attention's weighted sum (0 * NaN).
                shape = (slots, store.shape[1], _round_up(columns, COLUMN_QUANTUM), store.shape[-1])
                target = store.new_zeros(shape)
                setattr(self, name, target)
            target[: self.rows, :, width - old_width:width] = current
        self.lo, self.end = 0, width
        self._expose()
        return not in_place

    def append(self, other: "_SlotLayer") -> None:
        """Copy `other`'s rows into the slots after this layer's rows, right-aligned in the window
        (which `lay_out` has made at least as wide as theirs)."""
        start, width = self.rows, other.end - other.lo
        self.key_store[start:start + other.rows, :, self.end - width:self.end] = other.keys
        self.value_store[start:start + other.rows, :, self.end - width:self.end] = other.values
        self.rows += other.rows
        self._expose()

    def move_rows(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copy the rows at slots `source` into slots `target` (the window's columns only)."""
        for store in (self.key_store, self.value_store):
            window = store[:, :, self.lo:self.end]
            window.index_copy_(0, target, window.index_select(0, source))

    def narrow(self, rows: int, padding: int) -> None:
        """Keep the first `rows` rows; the window's first `padding` columns, padding for all of them,
        leave it."""
        self.rows = rows
        self.lo += padding
        self._expose()


def _round_up(count: int, quantum: int) -> int:
    return -(-count // quantum) * quantum


class Batch:
    def __init__(self, rows, next_tokens, attention_mask, layers, vocab_size):
        """`rows`: objects with `params`, `prompt_ids`, `generated` and `max_total_tokens` (read, not kept);
        `layers`: each layer's keys and values [rows, heads, columns, head_dim], which become the
        batch's storage as they are (a prefilled group gets room to decode once it needs it)."""
        self.rows = len(rows)
        self.next_tokens: torch.Tensor = next_tokens  # [B] the tokens to feed at the next step
        self.attention_mask: torch.Tensor = attention_mask  # [B, W] over the window's columns
        self.cache = DynamicCache()
        self.cache.layers = [_SlotLayer(keys, values) for keys, values in layers]
        self.vocab_size = vocab_size
        self._horizon = _horizon(rows)  # the storage's columns when laying out
        self.sampling = SamplingTensors.build([row.params for row in rows], attention_mask.device, vocab_size)
        self.seen: torch.Tensor | None = None  # [B, V] bool: prompt and output tokens (repetition penalty)
        self.output_counts: torch.Tensor | None = None  # [B, V] int: output tokens (presence/frequency)
        if self._uses_penalties:
            self._build_penalty_state(rows)

    def __len__(self) -> int:
        return self.rows

    @property
    def device(self) -> torch.device:
        return self.attention_mask.device

    @property
    def width(self) -> int:
        """Columns of the window the model attends over."""
        return self.attention_mask.shape[1]

    @property
    def _layers(self) -> list[_SlotLayer]:
        return self.cache.layers

    @property
    def _uses_penalties(self) -> bool:
        return self.sampling.use_repetition or self.sampling.use_presence_frequency

    # ---- building -------------------------------------------------------------------------------

    @classmethod
    @torch.inference_mode()
    def prefill(cls, model, rows: list, vocab_size: int, want_prompt_logprobs: list[int | None]):
        """Run the prompts of new requests through the model once (app/engine/prefill.py).

        `rows` holds each request's rows consecutively (each with its `handle`); rows of one request
        share its prefill.
        `want_prompt_logprobs[i]` is None, or the number of alternatives for request i's prompt tokens.
        Returns the new batch, the logits for each row's first token, and prompt log-probabilities.
        """
        handles = list(dict.fromkeys(row.handle for row in rows))
        prompts = [h.request.prompt_ids for h in handles]
        any_prompt_logprobs = any(k is not None for k in want_prompt_logprobs)
        cache, attention_mask, last_logits, prompt_logits = run_prompts(model, prompts, any_prompt_logprobs)
        prompt_logprobs = [
            None if k is None else _prompt_logprobs(prompt_logits[i], prompts[i], k)
            for i, k in enumerate(want_prompt_logprobs)
        ]
        batch, last_logits = cls._from_prompts(rows, handles, cache, last_logits, attention_mask, vocab_size)
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
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        return cls(rows, empty, attention_mask, layers, vocab_size), last_logits

    @classmethod
    def concatenate(cls, batches: list["Batch | None"], rows: list) -> "Batch | None":
        """The first batch with the others' rows appended after its own (copied into its storage;
        nothing of its own rows moves unless the storage must grow); `rows` are the merged rows."""
        batches = [b for b in batches if b is not None and len(b)]
        if not batches:  # none left when every new row finished on its first token
            return None
        merged, others = batches[0], batches[1:]
        for other in others:
            merged._append(other, rows[: merged.rows + other.rows])
        return merged

    def _append(self, other: "Batch", rows: list) -> None:
        width = max(self.width, other.width)
        self._horizon = max(self._horizon, other._horizon)
        self._lay_out(self.rows + other.rows, width)
        for layer, theirs in zip(self._layers, other._layers):
            layer.append(theirs)
        self.attention_mask = torch.cat([F.pad(self.attention_mask, (width - self.width, 0)),
                                         F.pad(other.attention_mask, (width - other.width, 0))])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        penalties_before = self.seen is not None and other.seen is not None
        if penalties_before:
            self.seen = torch.cat([self.seen, other.seen])
            self.output_counts = torch.cat([self.output_counts, other.output_counts])
        self.rows += other.rows
        self.sampling = SamplingTensors.build([row.params for row in rows], self.device, self.vocab_size)
        if not self._uses_penalties:
            self.seen = self.output_counts = None
        elif not penalties_before:
            self._build_penalty_state(rows)

    def _lay_out(self, rows_needed: int, width: int) -> None:
        """Room for `rows_needed` rows and a window of `width` columns, in storage as wide as the rows'
        horizon (at least one free column after the window)."""
        for layer in self._layers:
            if layer.lay_out(rows_needed, width, max(width + 1, self._horizon)):
                release_free_memory()  # the layer's old storage, before the next layer allocates its new one

    def filter(self, keep: list[int], rows: list) -> list:
        """Keep only the rows at positions `keep` of `rows` (the batch's rows); returns the rows in
        the batch's new order. A row leaving frees its slot for the batch's last row, so only that
        one row moves; columns that became padding for every row leave the window."""
        if len(keep) == self.rows:  # nobody leaves (most steps)
            return list(rows)
        kept = set(keep)
        order = list(range(self.rows))  # new slot -> the row's slot before
        for position in reversed(range(self.rows)):  # from the end, so the last slot is always kept
            if position not in kept:
                order[position] = order[-1]
                order.pop()
        if not order:
            self.rows = 0
            return []
        moves = [(before, slot) for slot, before in enumerate(order) if before != slot]
        if moves:
            source = torch.tensor([before for before, _ in moves], device=self.device)
            target = torch.tensor([slot for _, slot in moves], device=self.device)
            for layer in self._layers:
                layer.move_rows(source, target)
            for tensor in (self.attention_mask, self.next_tokens, self.seen, self.output_counts):
                if tensor is not None:
                    tensor.index_copy_(0, target, tensor.index_select(0, source))
        self.rows = len(order)
        self.next_tokens = self.next_tokens[: self.rows]
        mask = self.attention_mask[: self.rows]
        padding = int(mask.any(dim=0).long().argmax())  # columns before the first one any row uses
        self.attention_mask = mask[:, padding:]
        for layer in self._layers:
            layer.narrow(self.rows, padding)
        new_rows = [rows[i] for i in order]
        self._horizon = _horizon(new_rows)
        self.sampling = SamplingTensors.build([row.params for row in new_rows], self.device, self.vocab_size)
        if self._uses_penalties:  # its rows used penalties before, so the state is there
            self.seen, self.output_counts = self.seen[: self.rows], self.output_counts[: self.rows]
        else:
            self.seen = self.output_counts = None
        return new_rows

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
        if self._layers[0].end == self._layers[0].columns:  # no free column left: lay out anew
            self._lay_out(self.rows, self.width)
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


def _horizon(rows) -> int:
    """Columns the longest of the rows can ever take: its prompt and every token it may generate.
    The window never needs more (a row leaves before it would), so storage this wide needs at most
    a shift back to column 0 now and then, never more columns."""
    return max((row.max_total_tokens for row in rows), default=1)


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
    """Log-probability of each prompt token given the ones before it (the first has none), from the
    logits at the prompt's own positions."""
    if len(prompt) < 2:
        return [None] * len(prompt)
    predicting = logits[:-1]  # position i predicts token i + 1
    targets = torch.tensor(prompt[1:], device=logits.device)
    return [None, *token_logprobs(predicting, targets, top)]
