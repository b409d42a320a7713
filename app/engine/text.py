"""Turning one sequence's tokens into text as they arrive: incremental decoding and stop strings."""

from __future__ import annotations

# Tokens of the prompt's end that seed the decoder, so that the first generated token decodes with
# the spacing it has in context (some tokenizers drop a leading space at the start of a decode).
_CONTEXT_TOKENS = 4


class IncrementalDecoder:
    """Decode a growing token list in O(1) per token.

    Byte-level tokenizers can split one UTF-8 character over several tokens; until the character is
    complete the decoded text ends in U+FFFD, and nothing is released.
    """

    def __init__(self, tokenizer, prompt_ids):
        # The `tokenizers` object decodes without the Python-level overhead of the transformers wrapper.
        self._decode = getattr(tokenizer, "backend_tokenizer", None)
        self._decode = self._decode.decode if self._decode is not None else tokenizer.decode
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def _text(self, start: int, end: int | None = None) -> str:
        return self._decode(self._ids[start:end], skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._text(self._prefix, self._read)
        new_text = self._text(self._prefix)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._text(self._prefix, self._read)
        new_text = self._text(self._prefix)
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):]


class StopStringFilter:
    """Holds back text that may be the start of a stop string; cuts the text at a stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._text = ""
        self._released = 0

    def push(self, delta: str) -> tuple[str, bool]:
        """Add decoded text; return (text safe to release now, whether a stop string was hit)."""
        if not self._stops or not delta:  # nothing new to search
            return delta, False
        search_from = max(0, len(self._text) - self._longest + 1)
        self._text += delta
        hits = [p for p in (self._text.find(s, search_from) for s in self._stops) if p >= 0]
        if hits:
            self._text = self._text[: min(hits)]
            return self._release(len(self._text)), True
        return self._release(len(self._text) - self._held_back()), False

    def flush(self) -> str:
        return self._release(len(self._text))

    def _held_back(self) -> int:
        """Length of the longest end of the text that is a proper start of some stop string."""
        tail = self._text[-(self._longest - 1):] if self._longest > 1 else ""
        for size in range(len(tail), 0, -1):
            if any(s.startswith(tail[-size:]) for s in self._stops):
                return size
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self._released)
        out = self._text[self._released:upto]
        self._released = upto
        return out
