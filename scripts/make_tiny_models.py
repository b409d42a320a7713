"""Make tiny GPT-2, GPT-Neo and GPT-J models with a real fast tokenizer, offline.

The tests, the CI image build and the benchmarks use these instead of hub downloads: they are
real `transformers` architectures, saved with `save_pretrained` exactly like a hub checkout, so
the server loads them through its production code path.

    python scripts/make_tiny_models.py OUT_DIR            # OUT_DIR/gpt2, OUT_DIR/gpt-neo, OUT_DIR/gptj
    python scripts/make_tiny_models.py OUT_DIR --only gpt2
"""

from __future__ import annotations

import argparse
import inspect
import pathlib
import sys

EOS = "<|endoftext|>"


def training_text() -> list[str]:
    """Plain English and code from the standard library's docstrings: always on disk, offline."""
    import collections, contextlib, io, json, os, pathlib as pl, re, string, textwrap  # noqa: E401

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
        import this
    codec = "".join(this.d.get(c, c) for c in this.s)
    docs = [inspect.getdoc(obj) or "" for obj in (collections, json, os, pl, re, string, textwrap, str, dict, list)]
    return [codec, *docs, "Hello world! When Konrad Adenauer was elected chancellor in 1949, Germany"]


def make_tokenizer(vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def make_config(arch: str, vocab_size: int, eos_id: int):
    from transformers import GPT2Config, GPTJConfig, GPTNeoConfig

    common = dict(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id)
    if arch == "gpt2":
        return GPT2Config(n_positions=1024, n_embd=64, n_layer=2, n_head=4, **common)
    if arch == "gpt-neo":
        return GPTNeoConfig(
            max_position_embeddings=2048, hidden_size=64, num_layers=2, num_heads=4,
            attention_types=[[["global", "local"], 1]], window_size=256, **common,
        )
    if arch == "gptj":
        return GPTJConfig(n_positions=2048, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, **common)
    raise ValueError(f"unknown architecture {arch!r}")


ARCHITECTURES = ("gpt2", "gpt-neo", "gptj")


def make_model(arch: str, out: pathlib.Path, seed: int = 0) -> pathlib.Path:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    config = make_config(arch, len(tokenizer), tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--only", choices=ARCHITECTURES, action="append", help="make only this architecture")
    args = parser.parse_args(argv)
    for arch in args.only or ARCHITECTURES:
        path = make_model(arch, args.out_dir / arch)
        print(f"{arch}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
