"""Memory freed by large tensors goes back to the system when the server says so, under jemalloc (the
images' allocator) as under glibc's."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from app.allocator import release_free_memory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JEMALLOC = sorted(glob.glob("/usr/lib/*/libjemalloc.so.2"))

# 3,000 tensors of 64 KB (200 MB), freed: jemalloc hands most of it back by itself, and keeps about
# 50 MB of the pages for reuse (10 s by default) until purged.
SCRIPT = """
import re, torch
from app.allocator import release_free_memory
def anonymous_mb():
    return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
tensors = [torch.ones(16_000) for _ in range(3_000)]
del tensors
before = anonymous_mb()
release_free_memory()
print(before - anonymous_mb())
"""


@pytest.mark.skipif(not JEMALLOC, reason="needs libjemalloc2 (Debian's package; CI installs it)")
def test_jemalloc_hands_freed_tensors_back_at_once():
    env = dict(os.environ, LD_PRELOAD=JEMALLOC[0], PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout) > 25, out.stdout  # MB handed back by the purge


def test_releasing_memory_changes_nothing_else():
    import torch

    kept = torch.arange(1_000_000, dtype=torch.float32)
    freed = torch.ones(4_000_000)
    del freed
    release_free_memory()
    assert torch.equal(kept, torch.arange(1_000_000, dtype=torch.float32))
