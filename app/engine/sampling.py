"""Choosing each row's next token with that row's own parameters, for the whole batch at once.

Every filter (top-k, top-p, typical-p) is reduced to a mask over the vocabulary, and sampling
always walks the vocabulary in its natural order with one uniform number drawn from the row's
own random generator. So a row's token depends only on its logits, its parameters and its seed,
never on which other rows share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.engine.request import SamplingParams, TokenLogprob

NEG_INF = float("-inf")
# Below this a sampling request is decoded greedily (vLLM's threshold): dividing logits by a smaller
# temperature overflows float32, and the distribution is a point mass on the most likely token anyway.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingTensors:
    """Per-row sampling parameters as tensors; rebuilt only when the batch's rows change."""

    greedy: torch.Tensor  # [B] bool
    temperature: torch.Tensor  # [B, 1]
    top_k: torch.Tensor  # [B] long, 0 = off
    top_p: torch.Tensor  # [B, 1]
    typical_p: torch.Tensor  # [B, 1]
    min_p: torch.Tensor  # [B, 1], 0 = off
    repetition: torch.Tensor  # [B, 1]
    presence: torch.Tensor  # [B, 1]
    frequency: torch.Tensor  # [B, 1]
    all_greedy: bool
    any_greedy: bool
    use_top_k: bool
    top_k_suffices: bool  # every sampling row has a top-k and no typical-p: its draw needs only candidates
    needs_full_sort: bool  # some sampling row has top-p without top-k: its nucleus may reach past any k
    use_typical: bool
    use_min_p: bool
    use_repetition: bool
    use_presence_frequency: bool

    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device, vocab_size: int) -> "SamplingTensors":
        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)

        # A temperature so small that logits / temperature overflows means "the most likely token".
        sampling = [p.do_sample and p.temperature >= MIN_TEMPERATURE for p in params]
        # A top-k of the vocabulary's size or more keeps everything: clamped, it cannot overflow a tensor.
        top_k = [min(p.top_k, vocab_size) if s else 0 for p, s in zip(params, sampling)]
        active = [(p, k) for p, k, s in zip(params, top_k, sampling) if s]
        return cls(
            greedy=torch.tensor([not s for s in sampling], device=device),
            temperature=column([p.temperature if s else 1.0 for p, s in zip(params, sampling)]),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            top_p=column([min(p.top_p, 1.0) if s else 1.0 for p, s in zip(params, sampling)]),
            typical_p=column([min(p.typical_p, 1.0) if s else 1.0 for p, s in zip(params, sampling)]),
            min_p=column([p.min_p if s else 0.0 for p, s in zip(params, sampling)]),
            repetition=column([p.repetition_penalty for p in params]),
            presence=column([p.presence_penalty for p in params]),
            frequency=column([p.frequency_penalty for p in params]),
            all_greedy=not active,
            any_greedy=len(active) < len(params),
            top_k_suffices=all(k > 0 for _, k in active) and not any(p.typical_p < 1.0 for p, _ in active),
            use_top_k=any(k > 0 for _, k in active),
            needs_full_sort=any(k == 0 and p.top_p < 1.0 for p, k in active),
            use_typical=any(p.typical_p < 1.0 for p, _ in active),
            use_min_p=any(p.min_p > 0.0 for p, _ in active),
            use_repetition=any(p.repetition_penalty != 1.0 for p in params),
            use_presence_frequency=any(p.presence_penalty or p.frequency_penalty for p in params),
        )


def apply_penalties(logits, t: SamplingTensors, seen, output_counts):
    """Logits with the repetition, presence and frequency penalties; `logits` itself when none applies.

    `seen` [B, V] marks the prompt's and the output's tokens, `output_counts` [B, V] counts the output's.
    """
    if t.use_repetition:
        penalized = torch.where(logits > 0, logits / t.repetition, logits * t.repetition)
        logits = torch.where(seen, penalized, logits)
    if t.use_presence_frequency:
        counts = output_counts.to(logits.dtype)
        logits = logits - (t.frequency * counts + t.presence * (counts > 0).to(logits.dtype))
    return logits


def _typical_mask(logits, typical_p):
    """Tokens outside each row's locally typical set (Meister et al.), as in transformers' warper."""
    log_probs = torch.log_softmax(logits, dim=-1)
    entropy = -(log_probs.exp() * log_probs).nansum(-1, keepdim=True)
    shifted = (-log_probs - entropy).abs()
    sorted_shifted, order = torch.sort(shifted, dim=-1)
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < typical_p).sum(dim=-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    return shifted > sorted_shifted.gather(-1, last)


def _cutoff(candidates: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Each row's top-k / top-p cut-off [B, 1]: the smallest kept value among its candidates (its
    largest scaled logits, in descending order); -inf for rows with neither filter."""
    width = candidates.shape[-1]
    k = torch.where(t.top_k > 0, t.top_k.clamp(max=width), torch.full_like(t.top_k, width))
    position = torch.arange(width, device=candidates.device).unsqueeze(0)
    candidates = candidates.masked_fill(position >= k.unsqueeze(1), NEG_INF)
    probs = candidates.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    candidates = candidates.masked_fill((mass_before >= t.top_p) & (position > 0) & (t.top_p < 1.0), NEG_INF)
    last_kept = (candidates > NEG_INF).sum(dim=-1, keepdim=True) - 1
    filtered = ((t.top_k > 0) | (t.top_p.squeeze(1) < 1.0)).unsqueeze(1)
    return torch.where(filtered, candidates.gather(-1, last_kept), NEG_INF)


def _top_k_width(t: SamplingTensors, vocab: int) -> int:
    return min(int(t.top_k.max()), vocab)


def warp(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Sampling rows' logits divided by their temperature, with every filtered-out token at -inf.

    The order of transformers' generate: temperature, top-k, top-p, min-p, then typical-p. A token
    equal to a row's cut-off is kept, as transformers keeps it.
    """
    scaled = logits / t.temperature
    if t.use_top_k or t.needs_full_sort:
        if t.needs_full_sort:  # a nucleus without top-k may reach past any k
            candidates, _ = torch.sort(scaled, dim=-1, descending=True)
        else:
            candidates, _ = torch.topk(scaled, _top_k_width(t, scaled.shape[-1]), dim=-1)
        scaled = scaled.masked_fill(scaled < _cutoff(candidates, t), NEG_INF)
    if t.use_min_p:
        # p < min_p * p_max  <=>  logit < max logit + log(min_p): no softmax needed.
        floor = scaled.max(dim=-1, keepdim=True).values + torch.log(t.min_p)
        scaled = scaled.masked_fill(scaled < floor, NEG_INF)
    if t.use_typical:
        scaled = scaled.masked_fill(_typical_mask(scaled, t.typical_p), NEG_INF)
    return scaled


def _walk(scaled: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the position of the first token whose cumulative weight exceeds u x the total.

    Weights are exp(logit - row max): a filtered token weighs exactly 0, and the running sum adds
    left to right, so a row walks to the same token whether the walk covers the whole vocabulary
    or only the candidates (in vocabulary order) that can be kept.
    """
    weights = (scaled - scaled.max(dim=-1, keepdim=True).values).exp()
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    # Below the total, so the walk always ends on a token of non-zero weight (never a filtered one).
    targets = torch.minimum((uniforms.unsqueeze(1) * total).to(cdf.dtype), torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, targets, side="right").squeeze(1)


def _draw_among_candidates(logits: torch.Tensor, t: SamplingTensors, uniforms: torch.Tensor):
    """The draw when every sampling row has a top-k: only the k largest of each row are walked,
    not the vocabulary. None when a token beyond the candidates ties a row's cut-off (the
    whole-vocabulary walk keeps such a token, so that walk must decide)."""
    scaled = logits / t.temperature
    vocab = scaled.shape[-1]
    width = _top_k_width(t, vocab)
    values, ids = torch.topk(scaled, min(width + 1, vocab), dim=-1)
    cutoff = _cutoff(values[:, :width], t)
    if width < vocab and bool(((values[:, width:] >= cutoff) & ~t.greedy.unsqueeze(1)).any()):
        return None
    values, ids = values[:, :width], ids[:, :width]
    values = values.masked_fill(values < cutoff, NEG_INF)
    if t.use_min_p:
        values = values.masked_fill(values < values[:, :1] + torch.log(t.min_p), NEG_INF)
    order = ids.argsort(dim=-1)  # the walk goes in vocabulary order
    ids, values = ids.gather(-1, order), values.gather(-1, order)
    return ids.gather(-1, _walk(values, uniforms).unsqueeze(1)).squeeze(1)


def choose_tokens(logits: torch.Tensor, t: SamplingTensors, uniforms: torch.Tensor) -> torch.Tensor:
    """Next token per row: argmax for greedy rows, a filtered draw for sampling rows.

    `logits` [B, V] float32 already carry the penalties; `uniforms` [B] are the rows' draws in [0, 1).
    """
    greedy_tokens = logits.argmax(dim=-1) if t.any_greedy else None
    if t.all_greedy:
        return greedy_tokens
    sampled = None
    # On the CPU the running sum is sequential, so both walks give a row the same token bit for bit;
    # elsewhere a parallel scan may round differently, and every batch walks the whole vocabulary.
    if t.top_k_suffices and logits.device.type == "cpu":
        sampled = _draw_among_candidates(logits, t, uniforms)
    if sampled is None:
        sampled = _walk(warp(logits, t), uniforms)
    return sampled if greedy_tokens is None else torch.where(t.greedy, greedy_tokens, sampled)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """The model's log-probability of each chosen token and of its `top` most likely alternatives."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    chosen = log_probs.gather(-1, tokens.unsqueeze(1)).squeeze(1).tolist()
    if top > 0:
        top_values, top_ids = log_probs.topk(top, dim=-1)
        top_pairs = [tuple(zip(ids, values)) for ids, values in zip(top_ids.tolist(), top_values.tolist())]
    else:
        top_pairs = [()] * len(chosen)
    return [TokenLogprob(token, lp, pairs) for token, lp, pairs in zip(tokens.tolist(), chosen, top_pairs)]
