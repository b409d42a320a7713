"""A server-sent events reader for the tests that follows the HTML specification to the letter.

Lines end at CRLF, LF or CR and nowhere else: `str.splitlines()` would also break a JSON string at
U+2028, U+0085 and friends, which are legal raw inside an event's data. Events end at a blank line;
`data:` fields (one leading space removed) are joined with LF; lines starting with `:` are comments.
https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Iterable, Iterator


@dataclass(frozen=True)
class Event:
    data: str
    event: str = "message"
    id: str | None = None


def lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """The stream's lines, decoded as UTF-8, split on CRLF, LF or CR only (a CRLF split across two
    chunks is one line end)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    buffer = ""
    for chunk in chunks:
        buffer += decoder.decode(chunk if isinstance(chunk, bytes) else chunk.encode())
        while True:
            ends = [i for i in (buffer.find("\r"), buffer.find("\n")) if i >= 0]
            if not ends:
                break
            end = min(ends)
            if buffer[end] == "\r" and end == len(buffer) - 1:
                break  # a CR at the end of the chunk: the next chunk may start with its LF
            yield buffer[:end]
            buffer = buffer[end + (2 if buffer.startswith("\r\n", end) else 1):]
    buffer += decoder.decode(b"", final=True)
    if buffer.endswith("\r"):
        yield buffer[:-1]
    # Anything after the last line end is an incomplete event, which the specification discards.


def events(chunks: Iterable[bytes]) -> Iterator[Event]:
    data: list[str] = []
    event_type, last_id = "", None
    for line in lines(chunks):
        if not line:
            if data:
                yield Event("\n".join(data), event_type or "message", last_id)
            data, event_type = [], ""
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event_type = value
        elif name == "id" and "\0" not in value:
            last_id = value


def data(chunks: Iterable[bytes]) -> list[str]:
    """The data of every event, in order (e.g. JSON texts and a final "[DONE]")."""
    return [event.data for event in events(chunks)]


def json_events(chunks: Iterable[bytes]) -> list:
    """Every event's data parsed as JSON, leaving out OpenAI's closing "[DONE]"."""
    return [json.loads(text) for text in data(chunks) if text != "[DONE]"]


def chunks_of(response) -> Iterator[bytes]:
    """The body of a `requests` streaming response or a Flask test-client response, as it arrives."""
    if hasattr(response, "iter_content"):
        return response.iter_content(chunk_size=None)
    return response.iter_encoded()
