"""Every model of the original list on this machine: load time, peak memory and generation speed.

No download: for each model, random weights of exactly its architecture and size (the configs below
are the published ones) are written as safetensors in the dtype of its hub checkpoint, with the tiny
tokenizer of scripts/make_tiny_models.py. Then, per dtype, a fresh process loads them through the
server's own code (`app.model`: fit check, then load) and generates one greedy request of 128
new tokens through `app.engine.Engine`, measuring:

- load: seconds from the fit check to a ready engine, and the peak resident memory meanwhile;
- serving: the peak resident memory over load and generation (and the peak GPU memory on a GPU);
- the 128-token request: seconds to the first token, seconds in all, and tokens per second;
- the batch space the fit check left (MAX_BATCH_TOKENS), and the 1-minute load average before and
  after the measurement (other work on the machine slows every figure down).

A combination the fit check refuses (e.g. GPT-J-6B in float32 in 24 GB of RAM) is shown with its
reason instead of figures. The generated weights are deleted after each model unless --keep.

    python scripts/bench_models.py                          # all five, CPU: float32, bfloat16 and int8
    python scripts/bench_models.py --models gpt2 gpt-j-6B --dtypes bfloat16 int8
    python scripts/bench_models.py --device cuda            # float16 and bfloat16, a GTX 1070's 8 GB

On a GPU the process may use at most --gpu-memory (default 7.5GiB: what an 8 GB GTX 1070 leaves for
tensors after the CUDA context) and OFFLOAD=auto keeps what does not fit in CPU RAM. Run benchmarks
one at a time (the figures of overlapping runs mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The published configurations (config.json of each hub repository), with the tiny tokenizer's ids.
MODELS = {
    "gpt2": dict(
        repo="gpt2", model_type="gpt2", stored="float32",
        config=dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
    ),
    "gpt-neo-125M": dict(
        repo="EleutherAI/gpt-neo-125M", model_type="gpt_neo", stored="float32",
        config=dict(hidden_size=768, num_layers=12, num_heads=12, max_position_embeddings=2048, vocab_size=50257,
                    attention_types=[[["global", "local"], 6]], window_size=256),
    ),
    "gpt-neo-1.3B": dict(
        repo="EleutherAI/gpt-neo-1.3B", model_type="gpt_neo", stored="float32",
        config=dict(hidden_size=2048, num_layers=24, num_heads=16, max_position_embeddings=2048, vocab_size=50257,
                    attention_types=[[["global", "local"], 12]], window_size=256),
    ),
    "gpt-neo-2.7B": dict(
        repo="EleutherAI/gpt-neo-2.7B", model_type="gpt_neo", stored="float32",
        config=dict(hidden_size=2560, num_layers=32, num_heads=20, max_position_embeddings=2048, vocab_size=50257,
                    attention_types=[[["global", "local"], 16]], window_size=256),
    ),
    # The `float16` revision of the hub repository (MODEL_REVISION=float16): half the bytes of `main`.
    "gpt-j-6B": dict(
        repo="EleutherAI/gpt-j-6B", model_type="gptj", stored="float16",
        config=dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_positions=2048, vocab_size=50400,
                    tie_word_embeddings=False),
    ),
}

SAFETENSORS_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
PROMPT = "Hello world! When Konrad Adenauer was elected chancellor in 1949, Germany"
NEW_TOKENS = 128
# Random values are drawn once and repeated; a prime length keeps rows of a matrix from repeating.
BLOCK = 1_000_003


def make_config(name: str, eos_id: int):
    from transformers import AutoConfig

    spec = MODELS[name]
    return AutoConfig.for_model(spec["model_type"], bos_token_id=eos_id, eos_token_id=eos_id, **spec["config"])


def write_random_checkpoint(folder: pathlib.Path, config, dtype_name: str, seed: int = 0) -> int:
    """config.json and model.safetensors with finite random weights in `dtype_name`; returns the bytes.

    Nothing of the model is ever materialised: its shapes come from a meta-device instance, and the
    file is streamed from one block of normal values (std 0.02, as models are initialised), with
    LayerNorm scales 1 and biases 0.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = list(model.named_parameters())  # tied weights appear once, as in a saved checkpoint
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, param in params:
        size = param.numel() * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype_name], "shape": list(param.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw_header = json.dumps(header).encode()
    raw_header += b" " * (-len(raw_header) % 8)
    generator = torch.Generator().manual_seed(seed)
    block = (torch.randn(BLOCK, generator=generator) * 0.02).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    with open(folder / "model.safetensors", "wb") as file:
        file.write(struct.pack("<Q", len(raw_header)))
        file.write(raw_header)
        start = 0
        for name, param in params:
            if param.dim() == 1:  # LayerNorm scales and biases
                value = 1.0 if name.endswith("weight") else 0.0
                file.write(torch.full((param.numel(),), value, dtype=dtype).view(torch.uint8).numpy().tobytes())
                continue
            left = param.numel()
            while left:
                count = min(left, BLOCK - start)
                file.write(block[start:start + count].view(torch.uint8).numpy().tobytes())
                start, left = (start + count) % BLOCK, left - count
    return offset


def make_model(name: str, folder: pathlib.Path) -> int:
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_models import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(folder)
    return write_random_checkpoint(folder, make_config(name, tokenizer.eos_token_id), MODELS[name]["stored"])


# ---- the measuring process ----------------------------------------------------------------------


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")


def _rss(field: str = "VmHWM") -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def measure(folder: str, dtype: str, device: str, gpu_memory: str, new_tokens: int) -> dict:
    """Runs in its own process: fit check, load, one greedy request; the figures as a dict."""
    import logging

    import torch

    from app.engine import Delta, Engine, GenerationRequest
    from app.engine.engine import default_threads
    from app.model.errors import ModelLoadError
    from app.model.fit import plan_fit
    from app.model.loader import load_model
    from app.settings import Settings

    logging.basicConfig(level=logging.INFO, format="    %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(default_threads())
    on_gpu = device.startswith("cuda")
    settings = Settings(  # "int8": QUANTIZE=int8, which computes in float32
        model_id=folder, dtype="float32" if dtype == "int8" else dtype, quantize="int8" if dtype == "int8" else "none",
        device=device, memory_limit=gpu_memory if on_gpu else 0, offload="auto" if on_gpu else "none",
        _env_file=None,
    )
    figures = {"rss_before_load": _rss("VmRSS")}
    _reset_peak_rss()
    started = time.perf_counter()
    try:
        plan = plan_fit(settings)
    except ModelLoadError as exc:
        return {**figures, "refused": str(exc)}
    engine = Engine(lambda: load_model(settings, plan), max_batch_size=plan.max_batch_size,
                    max_batch_tokens=plan.max_batch_tokens, max_queue=1, queue_timeout=3600)
    engine.start()
    while engine.state == "loading":
        time.sleep(0.05)
    if not engine.ready:
        return {**figures, "refused": f"load failed: {engine.failure}"}
    figures.update(
        load_seconds=time.perf_counter() - started, peak_rss_load=_rss(), offloaded_bytes=plan.offloaded_bytes,
        served_as=engine.loaded.dtype_name, attention=engine.loaded.attn_implementation,
        max_batch_tokens=plan.max_batch_tokens,
    )
    prompt = engine.loaded.tokenizer(PROMPT).input_ids
    request = GenerationRequest(prompt_ids=tuple(prompt), max_new_tokens=new_tokens, ignore_eos=True)
    started = time.perf_counter()
    first_token, tokens = None, 0
    for event in engine.submit(request).stream():
        if isinstance(event, Delta) and event.token_ids:
            tokens += len(event.token_ids)
            first_token = first_token or time.perf_counter() - started
    seconds = time.perf_counter() - started
    figures.update(
        generated_tokens=tokens, first_token_seconds=first_token, generate_seconds=seconds,
        tokens_per_second=tokens / seconds, peak_rss=_rss(),
    )
    if on_gpu:
        figures.update(peak_gpu=torch.cuda.max_memory_reserved(), peak_gpu_allocated=torch.cuda.max_memory_allocated())
    engine.stop()
    return figures


# ---- the table ----------------------------------------------------------------------------------


def gb(size: float | None) -> str:
    return "-" if size is None else f"{size / 1024**3:.2f} GiB"


def cpu_name() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def hardware(device: str, gpu_memory: str) -> str:
    import psutil
    import torch

    text = (f"{cpu_name()}, {psutil.cpu_count(logical=False)} cores, "
            f"{psutil.virtual_memory().total / 1024**3:.0f} GiB RAM; torch {torch.__version__}")
    if device.startswith("cuda"):
        text += f"; {torch.cuda.get_device_name(0)} capped at {gpu_memory}"
    return text


def table(rows: list[dict], on_gpu: bool, new_tokens: int) -> str:
    head = ["model", "dtype", "stored as", "load", "peak RSS loading", "peak RSS serving"]
    head += ["peak GPU memory", "offloaded to RAM"] if on_gpu else []
    head += ["first token", f"{new_tokens} tokens", "tokens/s", "MAX_BATCH_TOKENS", "load average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for row in rows:
        cells = [row["model"], row["dtype"], row["stored"]]
        if "refused" in row or "error" in row:
            reason = row.get("refused") or row.get("error")
            cells.append(f"not run: {reason}")
            cells += [""] * (len(head) - len(cells))
        else:
            cells += [f"{row['load_seconds']:.1f} s", gb(row["peak_rss_load"]), gb(row["peak_rss"])]
            if on_gpu:
                cells += [gb(row.get("peak_gpu")), gb(row.get("offloaded_bytes") or None)]
            cells += [f"{row['first_token_seconds']:.2f} s", f"{row['generate_seconds']:.1f} s",
                      f"{row['tokens_per_second']:.1f}", str(row["max_batch_tokens"]),
                      "{} / {}".format(*row["load_average"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def short_reason(message: str) -> str:
    """The refusal's first sentence: what it needs and what is there."""
    return message.split(" To make it fit")[0].split(": ", 1)[-1]


def run_child(args, folder: pathlib.Path, dtype: str) -> dict:
    command = [sys.executable, __file__, "--measure", str(folder), dtype, "--device", args.device,
               "--gpu-memory", args.gpu_memory, "--new-tokens", str(args.new_tokens)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    for line in process.stderr.splitlines():
        if line.startswith("    "):
            print(line, flush=True)
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        return {"error": f"exit {process.returncode}: {(process.stderr.strip().splitlines() or ['?'])[-1]}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16", "int8"],
                        help="int8: QUANTIZE=int8 (CPU only)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--gpu-memory", default="7.5GiB", help="MEMORY_LIMIT on a GPU (default: a GTX 1070's)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--work-dir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "bench-models")
    parser.add_argument("--keep", action="store_true", help="keep the generated weights")
    parser.add_argument("--json", type=pathlib.Path, help="also write the figures to this file")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one measurement may take")
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        load_before = os.getloadavg()[0]
        figures = measure(*args.measure, args.device, args.gpu_memory, args.new_tokens)
        figures["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        print(json.dumps(figures), flush=True)
        os._exit(0)  # the engine thread is still parked on the model; nothing else needs a clean exit

    on_gpu = args.device.startswith("cuda")
    dtypes = args.dtypes or (["float16", "bfloat16"] if on_gpu else ["float32", "bfloat16", "int8"])
    print(f"hardware: {hardware(args.device, args.gpu_memory)}", flush=True)
    rows = []
    for name in args.models:
        spec = MODELS[name]
        folder = args.work_dir / name
        sys.path.insert(0, str(ROOT))
        from app.model.footprint import model_shape

        size = model_shape(make_config(name, 0)).parameters * {"float32": 4, "float16": 2}[spec["stored"]]
        args.work_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(args.work_dir).free
        if not (folder / "model.safetensors").exists() and free < size + 2 * 1024**3:
            rows += [dict(model=spec["repo"], dtype=d, stored=spec["stored"],
                          refused=f"{gb(size)} of weights but {gb(free)} free on disk") for d in dtypes]
            continue
        if not (folder / "model.safetensors").exists():
            started = time.perf_counter()
            written = make_model(name, folder)
            print(f"{name}: wrote {gb(written)} of random {spec['stored']} weights in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        for dtype in dtypes:
            print(f"{name} as {dtype} on {args.device} ...", flush=True)
            figures = run_child(args, folder, dtype)
            if "refused" in figures:
                figures["refused"] = short_reason(figures["refused"])
            rows.append(dict(model=spec["repo"], dtype=dtype, stored=spec["stored"], **figures))
            print("  " + json.dumps(rows[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(folder)
    print()
    print(f"hardware: {hardware(args.device, args.gpu_memory)}")
    print(table(rows, on_gpu, args.new_tokens))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
