"""How much QUANTIZE=int8 (and DTYPE=bfloat16) change what a trained model predicts: perplexity and greedy agreement.

    python scripts/quality_int8.py                    # train (once, minutes on 2 cores), then compare
    python scripts/quality_int8.py --train-steps 1000 --retrain   # a longer-trained model

Random weights cannot tell good quantization from bad (every output is about equally likely), so this
first trains a small GPT-2 on text every Python installation has: the standard library's own sources,
code and docstrings. Nothing is downloaded; the model and its tokenizer are kept in a cache folder
(default .cache/quality-int8, outside version control) and reused by later runs.

Then it loads that model through the server's own loader as float32 (QUANTIZE=none), int8 (QUANTIZE=int8,
with each of its two kernels) and bfloat16 (DTYPE=bfloat16), and scores source files the training never
saw (one file in ten is held out):

- perplexity of each, and its ratio to float32's (the check: every one within 1 % of float32);
- greedy agreement: how often int8's most likely next token is float32's;
- top-1 accuracy of each against the real next token.

Windows are scored in batches, as the server runs them: the int8 layers quantize each batch's
activations with one scale, so the rows of a batch share it. int8 is also scored one window at a
time, and the script says how often the batch changed int8's greedy token (a request's output with
QUANTIZE=int8 depends a little on what runs beside it). Exit status 1 if the perplexity check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import pathlib
import random
import sys
import sysconfig
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONTEXT = 256
VOCAB = 8192
SKIPPED_FOLDERS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
MAX_PERPLEXITY_RATIO = 1.01


# ---- text ----------------------------------------------------------------------------------------

def source_files() -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    """The standard library's .py files, split into training files and held-out files (1 in 10)."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if not SKIPPED_FOLDERS & set(p.relative_to(stdlib).parts))
    if not files:
        sys.exit(f"no Python sources under {stdlib}")
    held_out = [p for p in files if hashlib.sha1(p.name.encode()).digest()[0] % 10 == 0]
    training = [p for p in files if p not in set(held_out)]
    return training, held_out


def read(paths: list[pathlib.Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


# ---- the model -----------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], folder: pathlib.Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def token_stream(tokenizer, texts: list[str]):
    import torch

    ids = []
    for text in texts:
        ids.extend(tokenizer(text).input_ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def train(folder: pathlib.Path, steps: int, threads: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(threads)
    training, _ = source_files()
    texts = read(training)
    print(f"training text: {len(training)} standard-library files, {sum(map(len, texts)) / 1e6:.1f} M characters")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, folder)
    ids = token_stream(tokenizer, texts)
    print(f"tokens: {len(ids) / 1e6:.1f} M (vocabulary {len(tokenizer)})", flush=True)

    # GPT-2's architecture (Conv1D layers, tied output layer, learned positions), scaled down to train on
    # a CPU in minutes; wide enough (384) that its matrices look like a real model's to int8.
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=384, n_layer=4, n_head=6,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    batch, length = 8, 128
    generator = torch.Generator().manual_seed(0)
    started, loss_avg = time.monotonic(), None
    for step in range(1, steps + 1):
        # Learning rate: short warm-up, then cosine decay to a tenth.
        lr = 2e-3 * min(1.0, step / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - length - 1, (batch,), generator=generator)
        x = torch.stack([ids[s:s + length] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        if step % 50 == 0 or step == steps:
            print(f"  step {step}: loss {loss_avg:.3f} (perplexity {math.exp(loss_avg):.1f}), "
                  f"{(time.monotonic() - started) / 60:.1f} min", flush=True)
    model.eval().save_pretrained(folder)
    print(f"trained {steps} steps ({steps * batch * length / 1e6:.2f} M tokens) in "
          f"{(time.monotonic() - started) / 60:.1f} min; saved to {folder}")


# ---- the comparison ------------------------------------------------------------------------------

def score(model, windows, batch_size: int):
    """(summed negative log-likelihood, token count, argmax per position, correct top-1 count)."""
    import torch

    nll, count, correct, argmaxes = 0.0, 0, 0, []
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            x = windows[i:i + batch_size]
            logits = model(input_ids=x).logits[:, :-1].float()
            targets = x[:, 1:]
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                     reduction="sum").item()
            count += targets.numel()
            best = logits.argmax(-1)
            correct += (best == targets).sum().item()
            argmaxes.append(best)
    return nll, count, torch.cat(argmaxes), correct


def compare(folder: pathlib.Path, windows_wanted: int, batch_size: int, threads: int) -> bool:
    import torch

    sys.path.insert(0, str(ROOT))
    from app.model.int8 import quantize
    from app.model.loader import load_model
    from app.settings import Settings

    def load(dtype: str = "float32", quantize: str = "none", cpu_kernels: str = "packed"):
        return load_model(Settings(_env_file=None, model_id=str(folder), device="cpu", dtype=dtype, quantize=quantize,
                                   cpu_kernels=cpu_kernels, fit_check=False))

    torch.set_num_threads(threads)
    _, held_out = source_files()
    models = {"float32": load(), "int8": load(quantize="int8"), "bfloat16": load(dtype="bfloat16"),
              # transformers' own float32 layers, which int8 quantizes (the packed ones hold oneDNN's layout)
              "int8 int_mm": quantize(load(cpu_kernels="reference").model, "int8", kernel="int_mm")}
    tokenizer = models["float32"].tokenizer
    models = {label: getattr(m, "model", m) for label, m in models.items()}
    ids = token_stream(tokenizer, read(held_out))
    windows = ids[: len(ids) // CONTEXT * CONTEXT].view(-1, CONTEXT)
    order = random.Random(0).sample(range(len(windows)), min(windows_wanted, len(windows)))
    windows = windows[sorted(order)]
    print(f"held-out text: {len(held_out)} files, {len(windows)} windows of {CONTEXT} tokens "
          f"({windows.numel() / 1e3:.0f} k tokens), batches of {batch_size}")

    results = {}
    runs = [(label, label, batch_size) for label in models]
    if batch_size > 1:
        runs.append(("int8 alone", "int8", 1))
    for label, model, size in runs:
        started = time.perf_counter()
        nll, count, argmax, correct = score(models[model], windows, size)
        results[label] = (math.exp(nll / count), argmax, correct / count)
        print(f"  {label:>10} (batches of {size}): perplexity {results[label][0]:.3f}, "
              f"top-1 accuracy {results[label][2]:.2%} ({time.perf_counter() - started:.1f} s)", flush=True)
    float32, int8 = results["float32"], results["int8"]
    print()
    ok = True
    for label in ("int8", "int8 int_mm", "bfloat16"):
        other = results[label]
        ratio = other[0] / float32[0]
        ok = ok and ratio <= MAX_PERPLEXITY_RATIO
        print(f"perplexity: float32 {float32[0]:.3f}, {label} {other[0]:.3f}, ratio {ratio:.4f} "
              f"({(ratio - 1) * 100:+.2f} %; limit +{(MAX_PERPLEXITY_RATIO - 1) * 100:.0f} %) "
              f"{'OK' if ratio <= MAX_PERPLEXITY_RATIO else 'FAILED'}; greedy next-token agreement with float32 "
              f"{(other[1] == float32[1]).float().mean().item():.2%} of {other[1].numel()} positions")
    if "int8 alone" in results:
        # The int8 layers quantize each call's activations with one scale for the whole batch, so a row's
        # logits depend a little on the rows beside it; this says how often that changes the greedy token.
        alone = results["int8 alone"][1]
        print(f"greedy next-token agreement int8 in batches of {batch_size} vs int8 alone: "
              f"{(int8[1] == alone).float().mean().item():.2%}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=pathlib.Path, default=ROOT / ".cache" / "quality-int8")
    parser.add_argument("--train-steps", type=int, default=600, help="training steps of 8 x 128 tokens")
    parser.add_argument("--retrain", action="store_true", help="train again even if a model is cached")
    parser.add_argument("--windows", type=int, default=256, help="held-out windows of 256 tokens to score")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = physical cores)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from app.engine.engine import default_threads

    threads = args.threads or default_threads()
    folder = args.cache_dir / "model"
    if args.retrain or not (folder / "config.json").exists():
        train(folder, args.train_steps, threads)
    else:
        print(f"model: {folder} (cached; --retrain to train again)")
    return 0 if compare(folder, args.windows, args.batch_size, threads) else 1


if __name__ == "__main__":
    sys.exit(main())
