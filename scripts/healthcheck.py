#!/usr/bin/env python3
"""The images' health check: GET /health on the server's port and print one line.

Exit 0 when the server answers 200, 1 otherwise (503 while the model loads, no answer while the
process starts). One line either way, so `docker inspect`'s health log stays readable.
Standard library only: it runs with the image's system python3, in well under a second.
"""

import json
import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('PORT', '49151')}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (OSError, ValueError) as exc:  # refused while the process starts, timeouts, ...
        reason = getattr(exc, "reason", exc)
        print(f"health: no answer from {url}: {reason}")
        return 1
    try:
        state = json.loads(body).get("status", "?")
    except ValueError:
        state = "not JSON"
    print(f"health: HTTP {status} ({state})")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
