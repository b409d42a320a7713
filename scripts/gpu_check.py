"""Prove the GPU path in one command: throughput, exactness and the 8 GB promise, through the real server.

    python scripts/gpu_check.py                      # on a machine with an NVIDIA GPU (a few minutes)
    python scripts/gpu_check.py --device cpu --smoke # the same steps, small, on the CPU: checks the script

Everything is made here, offline, from the repository alone (random weights: speed and memory do not
depend on their values):
1. float16 and bfloat16 (float32 on the CPU): a GPT-2-small-sized model (scripts/bench.py's) served
   by `python -m app`; generated tokens/s at concurrency 1 and 16, each as a ratio to in-process
   `model.generate` at batch 1 / 16 in the same run, the median time to first token, and the peak
   GPU memory the server held;
2. greedy decoding through the server (`/v1/completions`, temperature 0) equal to `generate` for
   tiny GPT-2, GPT-Neo and GPT-J in float16 (their three servers run side by side);
3. the 8 GB promise, with the server's GPU memory capped at 8 GiB (MEMORY_LIMIT=8GiB): a
   gpt-neo-2.7B-shaped model serves in float16 entirely on the GPU, a gpt-j-6B-shaped one with
   OFFLOAD=auto; both written in float16 straight to disk (scripts/bench_models.py), never as float32
   (one server at a time; in a smoke run, which measures nothing, side by side);
4. the tests marked `cuda`.
It prints one table. Without a GPU (and without --device cpu) it stops at once and says so.

Needs the server's Python packages (requirements-dev.txt); torch may be any CUDA build.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

NEEDED = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "flask", "gunicorn", "gevent",
          "pydantic_settings", "requests", "psutil", "prometheus_client")
GREEDY_TOKENS = 24
CAP = "8GiB"
GREEDY_PROMPT = "When Konrad Adenauer was elected chancellor in"


@dataclass
class Line:
    check: str
    model: str
    dtype: str
    result: str


def fail(message: str) -> int:
    print(f"gpu_check: {message}", file=sys.stderr)
    return 2


def missing_packages(tests: bool) -> list[str]:
    return [name for name in (*NEEDED, *(["pytest"] if tests else [])) if importlib.util.find_spec(name) is None]


# ---- GPU memory ----------------------------------------------------------------------------------


class GpuMemory:
    """Peak GPU memory in use while a server runs, polled from nvidia-smi (the server is another process)."""

    def __init__(self, device: str):
        self.enabled = device.startswith("cuda") and bool(subprocess.run(
            ["sh", "-c", "command -v nvidia-smi"], capture_output=True).stdout)
        self.index = device.split(":")[1] if ":" in device else "0"
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def used_mib(self) -> int:
        out = subprocess.run(["nvidia-smi", "-i", self.index, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout.strip()
        return int(out) if out.isdigit() else 0

    def __enter__(self) -> "GpuMemory":
        if self.enabled:
            self.base = self.used_mib()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.used_mib() - self.base)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def text(self, rss_mb: float) -> str:
        return f"peak GPU {self.peak} MiB" if self.enabled else f"peak RSS {rss_mb:.0f} MB"


# ---- in-process generate -------------------------------------------------------------------------


def load(folder: pathlib.Path, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    return model, tokenizer


def generate_tokens_per_s(folder: pathlib.Path, device: str, dtype: str, batches: list[int], new_tokens: int) -> dict:
    """Generated tokens/s of `model.generate` in this process, per batch size (scripts/bench.py's prompts and sampling)."""
    import torch
    from bench import SAMPLING, prompts

    model, tokenizer = load(folder, device, dtype)
    tokenizer.pad_token_id, tokenizer.padding_side = 0, "left"
    found = {}
    for batch in batches:
        inputs = tokenizer(prompts(batch, seed=batch), return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, **SAMPLING)  # warm-up
            sync(device)
            started = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **SAMPLING)
            sync(device)
            found[batch] = (out.shape[1] - inputs.input_ids.shape[1]) * batch / (time.perf_counter() - started)
    del model
    free(device)
    return found


def greedy_generate(folder: pathlib.Path, device: str, dtype: str) -> str:
    import torch

    model, tokenizer = load(folder, device, dtype)
    inputs = tokenizer(GREEDY_PROMPT, return_tensors="pt").to(device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=GREEDY_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    del model
    free(device)
    return text


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---- the server ----------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(folder: pathlib.Path, device: str, dtype: str, **settings: str):
    from bench import RunningServer

    return RunningServer(folder, free_port(), {"DEVICE": device, "DTYPE": dtype, **settings})


def complete(url: str, max_tokens: int, temperature: float = 0.0) -> tuple[str, int, float]:
    """(text, completion tokens, seconds) of one /v1/completions request."""
    import requests

    model = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    started = time.perf_counter()
    response = requests.post(f"{url}/v1/completions", timeout=900, json={
        "model": model, "prompt": GREEDY_PROMPT, "max_tokens": max_tokens, "temperature": temperature, "seed": 0})
    response.raise_for_status()
    body = response.json()
    return body["choices"][0]["text"], body["usage"]["completion_tokens"], time.perf_counter() - started


# ---- the checks ----------------------------------------------------------------------------------


def check_throughput(work: pathlib.Path, device: str, dtypes: list[str], smoke: bool) -> list[Line]:
    import bench
    from make_tiny_models import make_model as make_tiny

    if smoke:  # bench's 124M model is minutes on a CPU; the tiny one has the same code path
        folder, name, new_tokens, levels = make_tiny("gpt2", work / "tiny-gpt2-speed"), "tiny gpt2", 16, [1, 4]
    else:
        folder, name, new_tokens, levels = bench.make_model(work / "gpt2-small"), "gpt2-small-sized", 128, [1, 16]
    bench.NEW_TOKENS = new_tokens  # what bench.stream_one asks the server for
    lines = []
    for dtype in dtypes:
        baseline = generate_tokens_per_s(folder, device, dtype, levels, new_tokens)
        with GpuMemory(device) as memory:
            server = serve(folder, device, dtype)
            try:
                rows = [bench.measure_server(server, name, c, requests_per_client=1 if smoke else 2) for c in levels]
            finally:
                server.stop()
        for row in rows:
            lines.append(Line(f"server c={row.concurrency}", name, dtype,
                              f"{row.tokens_per_s:.0f} tok/s = {row.tokens_per_s / baseline[row.concurrency]:.2f}x "
                              f"generate@{row.concurrency}; TTFT {row.p50_ttft * 1000:.0f} ms; "
                              f"{memory.text(row.peak_rss_mb)}"))
        print(f"gpu_check: throughput {dtype} done", flush=True)
    return lines


def check_greedy(work: pathlib.Path, device: str, dtype: str) -> list[Line]:
    from concurrent.futures import ThreadPoolExecutor

    from make_tiny_models import ARCHITECTURES, make_model as make_tiny

    folders = {arch: make_tiny(arch, work / f"tiny-{arch}") for arch in ARCHITECTURES}
    expected = {arch: greedy_generate(folder, device, dtype) for arch, folder in folders.items()}
    # The three tiny models' servers start together: their boots overlap, their memory is small.
    with ThreadPoolExecutor(len(folders)) as pool:
        starting = {arch: pool.submit(serve, folder, device, dtype) for arch, folder in folders.items()}
    lines = []
    try:
        for arch in ARCHITECTURES:
            text, _, _ = complete(starting[arch].result().url, GREEDY_TOKENS)  # raises if its server failed to start
            same = text == expected[arch]
            lines.append(Line("greedy = generate", f"tiny {arch}", dtype,
                              "equal" if same else f"DIFFERENT: server {text!r} vs generate {expected[arch]!r}"))
    finally:
        for future in starting.values():
            if future.exception() is None:
                future.result().stop()
    print("gpu_check: greedy done", flush=True)
    return lines


def check_8gb(work: pathlib.Path, device: str, smoke: bool) -> list[Line]:
    """Both models written in float16 straight to disk (never a float32 copy), with the tiny tokenizer,
    at their real shapes; in a smoke run at a toy size, served in float32 (the CPU cannot serve float16)."""
    from concurrent.futures import ThreadPoolExecutor

    from bench_models import MODELS, make_config as shaped_config, write_random_checkpoint
    from make_tiny_models import make_config as toy_config, make_tokenizer

    tokenizer = make_tokenizer()
    written = []
    for name, extra in (("gpt-neo-2.7B", {}), ("gpt-j-6B", {"OFFLOAD": "auto"})):
        folder = work / name
        started = time.perf_counter()
        if smoke:
            arch = {"gpt_neo": "gpt-neo", "gptj": "gptj"}[MODELS[name]["model_type"]]
            config = toy_config(arch, len(tokenizer), tokenizer.eos_token_id)
        else:
            config = shaped_config(name, tokenizer.eos_token_id)
        size = write_random_checkpoint(folder, config, "float16")
        tokenizer.save_pretrained(folder)
        shown = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
        written.append((name, extra, folder,
                        f"{name}-shaped ({shown} float16, written in {time.perf_counter() - started:.0f} s)"))
    if smoke:  # a smoke run measures nothing: both servers run side by side
        with ThreadPoolExecutor(len(written)) as pool:
            return list(pool.map(lambda args: serve_under_the_cap(*args, device=device, smoke=smoke), written))
    # One at a time: each server has the GPU, and the 8 GiB cap, to itself.
    return [serve_under_the_cap(*args, device=device, smoke=smoke) for args in written]


def serve_under_the_cap(name: str, extra: dict, folder: pathlib.Path, model: str, device: str, smoke: bool) -> Line:
    import requests

    check = f"8 GiB: {name}" + (" OFFLOAD=auto" if extra else "")
    # A smoke run serves the toy checkpoint in float32 on the CPU: the same loading and requests.
    settings = {"MEMORY_LIMIT": CAP, **extra} if not smoke else {}
    with GpuMemory(device) as memory:
        try:
            server = serve(folder, device, "float32" if smoke else "float16", **settings)
        except (RuntimeError, TimeoutError) as exc:
            return Line(check, model, "float16", f"FAILED to start: {exc}")
        try:
            health = requests.get(server.url + "/health", timeout=30).json()
            _, tokens, seconds = complete(server.url, 16, temperature=0.6)
        finally:
            server.stop()
    log = pathlib.Path(server.log.name).read_text(errors="replace")
    offloaded = re.search(r"([\d.]+ \w*B) of weights in CPU RAM", log)
    on_gpu = str(health.get("device", "")).startswith("cuda")
    where = f"{offloaded.group(1)} offloaded" if offloaded else ("all on the GPU" if on_gpu else "in RAM")
    print(f"gpu_check: {name} done", flush=True)
    return Line(check, model, health.get("dtype", "?"),
                f"serves on {health.get('device')}, {where}; {tokens / seconds:.1f} tok/s"
                + (f"; peak GPU {memory.peak} MiB" if memory.enabled else ""))


def run_cuda_tests() -> Line:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1].strip("= ")
    return Line("pytest -m cuda", "tests", "-", f"{summary} (exit {proc.returncode})")


def print_table(lines: list[Line], header: str) -> None:
    print()
    print(header)
    print("| check | model | dtype | result |")
    print("|---|---|---|---|")
    for line in lines:
        print(f"| {line.check} | {line.model} | {line.dtype} | {line.result} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--smoke", action="store_true", help="tiny models and few tokens: checks the script, measures nothing")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the tests marked cuda")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        parser.error("--device must be cpu, cuda or cuda:N")
    missing = missing_packages(tests=not args.skip_tests)
    if missing:
        return fail(f"missing Python packages: {', '.join(missing)}; install them with "
                    "`pip install -r requirements-dev.txt` (offline: `--no-index --find-links` a wheel folder)")
    import torch

    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else \
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA device"
        return fail(f"no GPU: {why}. Run it on a machine with an NVIDIA GPU, or `--device cpu --smoke` "
                    "to check the script on the CPU.")
    if on_gpu:
        gpu = torch.cuda.get_device_properties(torch.device(args.device))
        header = (f"{gpu.name}, {gpu.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}, "
                  f"cuDNN {torch.backends.cudnn.version()}")
        dtypes = ["float16", "bfloat16"] if torch.cuda.is_bf16_supported() else ["float16"]
    else:
        header = f"CPU; torch {torch.__version__}" + (" (smoke run: the figures mean nothing)" if args.smoke else "")
        dtypes = ["float32"]
    greedy_dtype = "float16" if on_gpu else "float32"
    started = time.perf_counter()
    lines: list[Line] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = pathlib.Path(tmp)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        lines += check_throughput(work, args.device, dtypes, args.smoke)
        lines += check_greedy(work, args.device, greedy_dtype)
        lines += check_8gb(work, args.device, smoke=args.smoke or not on_gpu)
    if not args.skip_tests:
        lines.append(run_cuda_tests())
    print_table(lines, f"{header}; {time.perf_counter() - started:.0f} s")
    bad = [line for line in lines if line.result.startswith(("DIFFERENT", "FAILED")) or
           (line.check == "pytest -m cuda" and not line.result.endswith(("(exit 0)", "(exit 5)")))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
