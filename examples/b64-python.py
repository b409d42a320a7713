#!/usr/bin/env python3
"""Print a request body whose prompt, the start of a Python function, is sent base64-encoded (in_64).

Use it with `scripts/curl_from_encoded examples/b64-python.py`. `base64.encodebytes` wraps its
output in lines of 76 characters; the server ignores whitespace inside in_64, so they can stay.
"""

import base64
import json

PROMPT = '''\
import csv


def read_prices(path: str) -> dict[str, float]:
    """Read a CSV file of "name,price" rows into a dictionary; skip the header row."""
'''

body = {
    "text": {"in_64": base64.encodebytes(PROMPT.encode("utf-8")).decode("ascii")},
    "do_sample": True,
    "top_k": 10,
    "temperature": 0.1,
    "max_length": 256,
}
print(json.dumps(body, indent=4))
