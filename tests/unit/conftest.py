"""Fixtures of the unit tier: tiny real models built in memory, and an engine driven inline.

No server, no subprocess, no files: each architecture is made once per session from
`scripts/make_tiny_models.py`'s tokenizer and configs, with fixed random weights.
"""

from __future__ import annotations

import types

import pytest
import torch

from scripts.make_tiny_models import ARCHITECTURES, make_config, make_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny(tokenizer):
    """Architecture -> a loaded-model record (model, tokenizer, device) as the engine expects it."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    models = {}
    for arch in ARCHITECTURES:
        torch.manual_seed(0)
        config = make_config(arch, len(tokenizer), tokenizer.eos_token_id)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        models[arch] = types.SimpleNamespace(model=model, tokenizer=tokenizer, device=torch.device("cpu"),
                                             dtype=torch.float32, context_length=1024)
    return models


def inline_engine(loaded, **limits):
    """An engine that runs in the caller's thread: `run_until_idle` drives it turn by turn."""
    from app.engine import Engine

    settings = dict(max_batch_size=8, max_batch_tokens=8192, max_queue=8, queue_timeout=60.0) | limits
    engine = Engine(lambda: loaded, **settings)
    engine.load()
    return engine


def run_until_idle(engine, turns: int = 10_000) -> None:
    with torch.inference_mode():
        for _ in range(turns):
            if engine.idle:
                return
            engine.run_once()
    raise AssertionError("the engine did not finish its work")
