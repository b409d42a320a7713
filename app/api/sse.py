"""Server-sent events, framed so that every client splits them where the server meant.

Each event is one `data:` line followed by a blank line. JSON escapes every control character, but
leaves U+0085, U+2028 and U+2029 raw when it keeps non-ASCII text as is; clients that split lines
with `str.splitlines()` (or JavaScript's line terminators) would cut an event there. Those three are
written as JSON escapes, which every JSON parser reads back as the same characters.
"""

from __future__ import annotations

import json
from typing import Iterable

from flask import Response, stream_with_context

from app.engine import EngineError

_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def frame(event: dict | str) -> str:
    """One event: a dict as JSON, a str as is (e.g. OpenAI's closing "[DONE]")."""
    payload = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False).translate(_LINE_BREAKS)
    return f"data: {payload}\n\n"


def sse_response(events: Iterable[dict | str]) -> Response:
    """A streaming response of `events`; an engine failure mid-stream becomes a last error event."""

    def body():
        try:
            for event in events:
                yield frame(event)
        except EngineError as exc:
            yield frame({"error": {"message": str(exc), "type": "server_error", "param": None, "code": exc.code}})

    response = Response(stream_with_context(body()), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response
