"""Benchmark the server against plain `model.generate` on the same model, in the same run.

    python scripts/bench.py                      # GPT-2-small-sized random model: float32 and int8 servers
    python scripts/bench.py --concurrency 1 16 --requests-per-client 2
    python scripts/bench.py --quantize none      # the float32 server only
    python scripts/bench.py --profile            # where a decoding step's time goes, batch 1 and 16
    python scripts/bench.py --long-prompts 900   # running streams' pace while 900-token prompts arrive

What it does:
1. makes (or reuses, in --model-dir) a GPT-2-small-sized model (124M parameters, vocabulary 50257)
   with random weights and a byte-level tokenizer without an end-of-sequence token, so every
   request generates its full length; nothing is downloaded;
2. measures in-process `model.generate` at batch 1 and 16 (the baseline);
3. starts the real server (`python -m app`) on that model, once per --quantize mode (float32, then
   QUANTIZE=int8), and for each concurrency level runs that many clients in parallel streaming
   `/generate_stream` with different 10-word (about 32-token) prompts, 128 new tokens, sampling with top-k 50 and
   temperature 0.6;
4. prints aggregate generated tokens/s, p50/p90 latency, p50 time to first token and the peak
   memory of all the server's processes, each throughput also as a ratio to the float32 baseline.
   Memory three ways: the sum of their peak resident sets, which counts the pages the worker shares
   with the master (it is forked from it) twice; the sampled peak of their proportional set sizes,
   which counts them once but may miss a short peak; and, where it may make one (root), the peak of a
   memory cgroup of the server's own, as a container's memory (`docker stats`) is counted, except that
   the pages of files this machine had read before (the libraries) are not charged to it.
The server runs as the images run it, with jemalloc as its allocator where libjemalloc2 is installed
(`LD_PRELOAD= python scripts/bench.py` keeps glibc's).

With --profile it instead drives the engine in this process (each --quantize mode, same requests) and prints,
for each batch size, the share of a decoding step spent in the model's forward, penalties,
sampling, log-probabilities, detokenization, batch bookkeeping and the Python around them, then
the forward's operators by self time (torch.profiler, in a second pass so its overhead does not
distort the shares).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent
NEW_TOKENS = 128
PROMPT_WORDS = 10  # about 32 tokens
SAMPLING = {"do_sample": True, "top_k": 50, "temperature": 0.6}
# Seconds between samples of the server's proportional set sizes. Each sample has the kernel walk the
# worker's page tables (/proc/PID/smaps_rollup): 18 ms of CPU for the float32 worker. Every 0.2 s that
# took 9 % of a core from a server that needs both: float32 at 16 streams 197-208 tokens/s against
# 228-229 sampling every second, in one run.
PSS_INTERVAL = 1.0


# ---- the model ----------------------------------------------------------------------------------

def byte_level_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens: the 256 bytes, then every pair and
    as many triples as fit of the 95 printable ASCII characters (space included).

    Every token but the 161 single non-ASCII bytes decodes to printable ASCII, so nearly every token
    the random model picks shows up as text at once: a streaming client's time to first text is the
    time to first token, not the wait for a complete UTF-8 character. It has no end-of-sequence
    token: the random model can never stop a request early.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    printable = [chr(c) for c in range(0x21, 0x7F)] + ["\u0120"]  # byte-level's own name for the space
    merges = []
    for left in [*printable, *(a + b for a in printable for b in printable)]:
        for right in printable:
            if len(vocab) >= vocab_size:
                break
            vocab[left + right] = len(vocab)
            merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def make_model(model_dir: pathlib.Path) -> pathlib.Path:
    if (model_dir / "config.json").exists():
        return model_dir
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(bos_token_id=None, eos_token_id=None)  # 124M parameters, like `gpt2`
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    byte_level_tokenizer(config.vocab_size).save_pretrained(model_dir)
    return model_dir


def prompts(count: int, seed: int = 0) -> list[str]:
    words = ("the model serves requests in batches while new ones arrive and finished ones leave "
             "every step decodes one token for each row of the batch on the same weights").split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(PROMPT_WORDS)) for _ in range(count)]


# ---- the baseline -------------------------------------------------------------------------------

def measure_generate(model_dir: pathlib.Path, batch_sizes: list[int], threads: int) -> dict[int, float]:
    """Generated tokens/s of plain `model.generate` in this process, per batch size."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token_id = 0
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = {}
    for batch in batch_sizes:
        inputs = tokenizer(prompts(batch, seed=batch), return_tensors="pt", padding=True)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, **SAMPLING)  # warm-up
            started = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **SAMPLING)
            seconds = time.perf_counter() - started
        generated = (out.shape[1] - inputs.input_ids.shape[1]) * batch
        results[batch] = generated / seconds
        print(f"  generate  batch {batch:>2}: {results[batch]:7.1f} tokens/s", flush=True)
    del model
    return results


# ---- the server ---------------------------------------------------------------------------------

@dataclass
class Row:
    label: str
    concurrency: int
    tokens_per_s: float
    p50_latency: float
    p90_latency: float
    p50_ttft: float
    peak_rss_mb: float
    peak_pss_mb: float
    peak_cgroup_mb: float | None


class RunningServer:
    def __init__(self, model_dir: pathlib.Path, port: int, env_extra: dict[str, str]):
        import requests

        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT), MODEL_ID=str(model_dir), PORT=str(port), HOST="127.0.0.1",
                   MAX_BATCH_SIZE="32", **env_extra)
        if "LD_PRELOAD" not in env:  # as the images run it: jemalloc when installed (LD_PRELOAD= keeps glibc's)
            env["LD_PRELOAD"] = next(iter(glob.glob("/usr/lib/*/libjemalloc.so.2")), "")
        self.log = open(model_dir.parent / f"server-{port}.log", "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "app"], env=env, cwd=model_dir.parent,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self.cgroup = _own_memory_cgroup(self.process.pid, port)
        self.peak_pss_mb = 0.0
        threading.Thread(target=self._sample_pss, daemon=True).start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log.name}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy loading
                pass
            time.sleep(0.5)
        raise TimeoutError("server did not become ready")

    def peak_rss_mb(self) -> float:
        """Peak resident memory (VmHWM) of all the server's processes together: the gunicorn master
        and its worker, which holds the model."""
        import psutil

        server = psutil.Process(self.process.pid)
        peak = 0
        for proc in [server, *server.children(recursive=True)]:
            for line in pathlib.Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak += int(line.split()[1])
        return peak / 1024

    def _sample_pss(self) -> None:
        """Keep the peak of the server's processes' proportional set sizes together, sampled every
        PSS_INTERVAL seconds from the start: pages the worker still shares with the master (it is
        forked from it) count once, as the container's memory (`docker stats`) counts them, where the
        sum of resident sets counts them twice. Short spikes between samples are missed; VmHWM and
        the cgroup's peak catch those."""
        import psutil

        while self.process.poll() is None:
            try:
                server = psutil.Process(self.process.pid)
                total = sum(p.memory_full_info().pss for p in [server, *server.children(recursive=True)])
                self.peak_pss_mb = max(self.peak_pss_mb, total / 2**20)
            except psutil.Error:  # a process came or went while it was read
                pass
            time.sleep(PSS_INTERVAL)

    def peak_cgroup_mb(self) -> float | None:
        """Peak memory charged to the server's own cgroup (as a container's: what `docker stats` counts),
        where this machine gave it one."""
        if self.cgroup is None:
            return None
        name = "memory.max_usage_in_bytes" if (self.cgroup / "memory.max_usage_in_bytes").exists() else "memory.peak"
        return int((self.cgroup / name).read_text()) / 2**20

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()
        if self.cgroup is not None:
            self.cgroup.rmdir()

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _own_memory_cgroup(pid: int, port: int) -> pathlib.Path | None:
    """Move the just-started server (its master: the worker it forks follows) into a memory cgroup of
    its own, cgroup v1's or v2's, where this process may make one (root, as CI runs); None elsewhere."""
    for parent in (pathlib.Path("/sys/fs/cgroup/memory"), pathlib.Path("/sys/fs/cgroup")):
        if not (parent / "cgroup.procs").exists():
            continue
        if parent.name != "memory" and "memory" not in (parent / "cgroup.subtree_control").read_text(errors="ignore"):
            continue
        group = parent / f"bench-server-{port}"
        try:
            group.mkdir(exist_ok=True)
            (group / "cgroup.procs").write_text(str(pid))
            return group
        except OSError:
            return None
    return None


def percentile(ordered: list[float], share: float) -> float:
    """The value below which `share` of the sorted values lie (the nearest rank)."""
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@dataclass
class Streamed:
    ttft: float  # time to the first text
    latency: float
    tokens: int
    gaps: list[float]  # time between consecutive text events


def stream_one(url: str, prompt: str) -> Streamed:
    import requests

    body = {"text": {"plain": prompt}, "max_new_tokens": NEW_TOKENS, **SAMPLING}
    started = time.perf_counter()
    arrivals = []
    tokens = 0
    with requests.post(url + "/generate_stream", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if event.get("text"):
                arrivals.append(time.perf_counter())
            if event.get("done"):
                tokens = event["usage"]["completion_tokens"]
    return Streamed(ttft=arrivals[0] - started if arrivals else 0.0, latency=time.perf_counter() - started,
                    tokens=tokens, gaps=[b - a for a, b in zip(arrivals, arrivals[1:])])


def measure_server(server: RunningServer, label: str, concurrency: int, requests_per_client: int) -> Row:
    stream_one(server.url, "warm up")
    results: list[Streamed] = []
    lock = threading.Lock()
    texts = prompts(concurrency * requests_per_client, seed=concurrency)

    def client(worker: int) -> None:
        for i in range(requests_per_client):
            outcome = stream_one(server.url, texts[worker * requests_per_client + i])
            with lock:
                results.append(outcome)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies = sorted(r.latency for r in results)
    return Row(
        label=label,
        concurrency=concurrency,
        tokens_per_s=sum(r.tokens for r in results) / wall,
        p50_latency=statistics.median(latencies),
        p90_latency=percentile(latencies, 0.9),
        p50_ttft=statistics.median(r.ttft for r in results),
        peak_rss_mb=server.peak_rss_mb(),
        peak_pss_mb=server.peak_pss_mb,
        peak_cgroup_mb=server.peak_cgroup_mb(),
    )


def measure_long_prompts(server: RunningServer, model_dir: pathlib.Path, streams: int, long_tokens: int) -> None:
    """Inter-token latency of `streams` running streams, alone and then while prompts of
    `long_tokens` tokens keep arriving (one after another, each asking for one new token)."""
    import requests
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = prompts(1, seed=99)[0].split() * (long_tokens // PROMPT_WORDS + 1)  # a token or more per word
    long_prompt = tokenizer.decode(tokenizer(" ".join(words)).input_ids[:long_tokens])
    stream_one(server.url, "warm up")

    def run(with_long_prompts: bool) -> tuple[list[float], int]:
        gaps: list[float] = []
        done = threading.Event()
        long_served = 0

        def streamer(i: int) -> None:
            gaps.extend(stream_one(server.url, prompts(streams, seed=i)[i]).gaps)

        def long_sender() -> None:
            nonlocal long_served
            while not done.is_set():
                body = {"text": {"plain": long_prompt}, "max_new_tokens": 1, **SAMPLING}
                requests.post(server.url + "/generate", json=body, timeout=600).raise_for_status()
                long_served += 1

        threads = [threading.Thread(target=streamer, args=(i,)) for i in range(streams)]
        sender = threading.Thread(target=long_sender)
        for t in threads:
            t.start()
        if with_long_prompts:
            time.sleep(0.5)  # the streams are decoding when the first long prompt arrives
            sender.start()
        for t in threads:
            t.join()
        done.set()
        if with_long_prompts:
            sender.join()
        return sorted(gaps), long_served

    print(f"\n{streams} streams of {NEW_TOKENS} tokens; inter-token latency (time between text events):")
    print("| | median ms | p99 ms | p99 / median | long prompts served |")
    print("|---|---:|---:|---:|---:|")
    for with_long in (False, True):
        gaps, served = run(with_long)
        median, p99 = statistics.median(gaps), percentile(gaps, 0.99)
        label = f"while {long_tokens}-token prompts arrive" if with_long else "alone"
        print(f"| {label} | {median * 1000:.1f} | {p99 * 1000:.1f} | {p99 / median:.2f} | {served} |")


def print_table(rows: list[Row], baseline: dict[int, float]) -> None:
    b1, b16 = baseline.get(1), baseline.get(16)
    print()
    print(f"baseline: model.generate float32, batch 1 = {b1:.1f} tokens/s, batch 16 = {b16:.1f} tokens/s")
    print("| server | concurrency | tokens/s | vs generate@1 | vs generate@16 | p50 latency s | p90 latency s "
          "| p50 TTFT s | peak RSS MB | peak PSS MB | peak cgroup MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.label} | {r.concurrency} | {r.tokens_per_s:.1f} | {r.tokens_per_s / b1:.2f} | "
              f"{r.tokens_per_s / b16:.2f} | {r.p50_latency:.2f} | {r.p90_latency:.2f} | {r.p50_ttft:.3f} | "
              f"{r.peak_rss_mb:.0f} | {r.peak_pss_mb:.0f} | "
              f"{'-' if r.peak_cgroup_mb is None else f'{r.peak_cgroup_mb:.0f}'} |")


# ---- the profile -------------------------------------------------------------------------------

def profile_engine(model_dir: pathlib.Path, quantize: str, batch_sizes: list[int], threads: int, steps: int) -> None:
    """Print where a decoding step's time goes at each batch size (the engine driven inline, on the
    model as the server loads it)."""
    import torch

    from app.engine import Engine, GenerationRequest, SamplingParams, profiling
    from app.model.loader import load_model
    from app.settings import Settings

    torch.set_num_threads(threads)
    loaded = load_model(Settings(_env_file=None, model_id=str(model_dir), device="cpu", quantize=quantize))
    tokenizer = loaded.tokenizer
    print(f"\nQUANTIZE={quantize}:", end="")

    def run(batch: int, new_tokens: int) -> None:
        engine = Engine(lambda: loaded, max_batch_size=batch, max_batch_tokens=10**9, max_queue=batch,
                        queue_timeout=3600)
        engine.load()
        for i, text in enumerate(prompts(batch, seed=batch)):
            params = SamplingParams(**SAMPLING, seed=i)
            engine.submit(GenerationRequest(tuple(tokenizer(text).input_ids), new_tokens, params))
        with torch.inference_mode():
            while engine.batch_size or engine.queue_size:
                engine.run_once()

    for batch in batch_sizes:
        run(batch, 4)  # warm-up
        clock = profiling.StepClock()
        profiling.install(clock)
        try:
            run(batch, steps)
        finally:
            profiling.install(None)
        shares = clock.shares(batch)
        total = shares["total"]
        print(f"\nbatch {batch}: {total * 1000:.1f} ms per decoding step ({shares['steps']} steps, "
              f"{batch / total:.1f} tokens/s)")
        for phase in (*profiling.PHASES, "python"):
            print(f"  {phase:<12} {shares[phase] * 1000:8.2f} ms  {100 * shares[phase] / total:5.1f} %")

        clock = profiling.StepClock()
        profiling.install(clock)
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                run(batch, min(steps, 16))
        finally:
            profiling.install(None)
        by_op: dict[str, float] = {}
        for event in prof.events():
            if event.name.startswith("engine."):
                continue
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("engine."):
                parent = parent.cpu_parent
            if parent is not None and parent.name == "engine.forward":
                by_op[event.name] = by_op.get(event.name, 0.0) + event.self_cpu_time_total
        forward_total = sum(by_op.values()) or 1.0
        print("  forward by operator (self time):")
        for name, micros in sorted(by_op.items(), key=lambda kv: -kv[1])[:10]:
            print(f"    {name:<40} {100 * micros / forward_total:5.1f} %")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=pathlib.Path, default=ROOT / ".cache" / "bench-gpt2-ascii")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--port", type=int, default=49170)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = physical cores)")
    parser.add_argument("--quantize", nargs="+", choices=["none", "int8"], default=["none", "int8"],
                        help="server modes to measure, one server each (QUANTIZE); the baseline is always float32")
    parser.add_argument("--profile", action="store_true",
                        help="profile decoding steps in process instead of benchmarking the server")
    parser.add_argument("--profile-batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--profile-steps", type=int, default=48)
    parser.add_argument("--long-prompts", type=int, metavar="TOKENS", default=0,
                        help="instead: inter-token latency of 4 running streams, alone and while prompts of "
                             "this many tokens arrive (one server per --quantize mode)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from app.engine.engine import default_threads

    threads = args.threads or default_threads()
    model_dir = make_model(args.model_dir.resolve())  # the server runs in the model's parent folder
    print(f"model: {model_dir} (GPT-2 small, random weights), {threads} torch threads", flush=True)
    if args.profile:
        for quantize in args.quantize:
            profile_engine(model_dir, quantize, args.profile_batch, threads, args.profile_steps)
        return 0
    if args.long_prompts:
        for quantize in args.quantize:
            with RunningServer(model_dir, args.port, {"TORCH_THREADS": str(threads), "QUANTIZE": quantize}) as server:
                print(f"\nserver QUANTIZE={quantize}:", end="")
                measure_long_prompts(server, model_dir, 4, args.long_prompts)
        return 0
    baseline = measure_generate(model_dir, [1, 16], threads)

    rows = []
    for quantize in args.quantize:
        label = "float32" if quantize == "none" else quantize
        with RunningServer(model_dir, args.port, {"TORCH_THREADS": str(threads), "QUANTIZE": quantize}) as server:
            for concurrency in args.concurrency:
                row = measure_server(server, label, concurrency, args.requests_per_client)
                print(f"  server {label} concurrency {concurrency:>2}: {row.tokens_per_s:7.1f} tokens/s", flush=True)
                rows.append(row)
    print_table(rows, baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
