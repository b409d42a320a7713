"""Load the real server with idle, slow, streaming and flooding clients, and print what a probe and a user see.

    python scripts/stress.py                         # every scenario, about four minutes on 2 cores
    python scripts/stress.py --idle-hold 10 --slow-seconds 10 --flood 100   # a quicker pass
    python scripts/stress.py --scenarios idle slow   # some scenarios only

It makes (or reuses, in --model-dir) the GPT-2-small-sized random model of scripts/bench.py, starts the
real server (`python -m app`) on 127.0.0.1, once with the defaults and once with MAX_QUEUE=8, and runs:

- idle:    --idle-sockets connections that connect and send nothing, held for --idle-hold seconds;
           an ordinary request is timed before (idle server) and while they are held;
- slow:    --slow-clients clients sending a request's headers one byte every --slow-interval seconds,
           for at most --slow-seconds; when (and whether) the server closed each one;
- streams: twice the batch rows streaming /generate_stream at once;
- flood:   --flood streaming clients at once, with the defaults and with MAX_QUEUE=8;
- burst:   exactly (batch rows + MAX_QUEUE) streaming clients at once with MAX_QUEUE=8.

For each scenario it prints /health p50 and p99 latency (a probe every 0.1 s, a fresh connection each
time as Docker and Kubernetes probes do; a probe without an answer in --probe-timeout seconds counts as
that long), the statuses, refusal latency, the longest wait of any request before its first token or its
refusal, the largest batch /health reported, and the peak resident memory of all server processes.
Every count and time is bounded by the flags; nothing but 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import pathlib
import resource
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench import ROOT, RunningServer, make_model, prompts  # noqa: E402  (the same model and server as the benchmark)

SCENARIOS = ("idle", "slow", "streams", "flood-default", "flood-queue8", "burst")


# ---- what the clients see -----------------------------------------------------------------------

@dataclass
class Outcome:
    status: str  # "200", "503", ..., "timeout", "error <name>"
    first: float | None = None  # seconds to the first token, or to the refusal
    total: float | None = None
    refused: bool = False


def stream_request(port: int, body: dict, timeout: float) -> Outcome:
    """One /generate_stream request: when its first token (or its refusal) came, and how it ended."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/generate_stream", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            response.read()
            now = time.perf_counter() - started
            return Outcome(str(response.status), now, now, refused=True)
        first = None
        status = "200"
        for line in response:  # SSE data lines; this payload never holds a raw line separator
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:  # refused after the stream began (a queue timeout, say)
                status = f"200+{event['error'].get('code')}"
                first = first if first is not None else time.perf_counter() - started
                return Outcome(status, first, time.perf_counter() - started, refused=True)
            if first is None and event.get("text"):
                first = time.perf_counter() - started
        return Outcome(status, first, time.perf_counter() - started)
    except (TimeoutError, socket.timeout):
        return Outcome("timeout", None, time.perf_counter() - started)
    except OSError as exc:
        return Outcome(f"error {type(exc).__name__}", None, time.perf_counter() - started)
    finally:
        connection.close()


def generate_once(port: int, new_tokens: int = 8, timeout: float = 60) -> float:
    """Latency of one small non-streaming /generate (the ordinary request)."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body = {"text": {"plain": "an ordinary request"}, "max_new_tokens": new_tokens, "do_sample": True, "seed": 1}
        connection.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"ordinary request answered {response.status}: {answer[:300]!r}")
        return time.perf_counter() - started
    finally:
        connection.close()


def run_clients(port: int, count: int, body: dict, timeout: float) -> list[Outcome]:
    """`count` streaming clients started together (a barrier), each on its own connection."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    barrier = threading.Barrier(count)

    def client() -> None:
        barrier.wait()
        outcome = stream_request(port, body, timeout)
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 30)
    return outcomes


# ---- what a probe and the operator see ----------------------------------------------------------

class Watch:
    """While a scenario runs: /health every 0.1 s, the batch it reports, and the server's memory."""

    def __init__(self, server: RunningServer, port: int, probe_timeout: float):
        self.server, self.port, self.probe_timeout = server, port, probe_timeout
        self.latencies: list[float] = []
        self.failed = 0
        self.max_batch = 0
        self.peak_rss_mb = 0.0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._probe, daemon=True),
                         threading.Thread(target=self._memory, daemon=True)]

    def __enter__(self) -> "Watch":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.probe_timeout + 5)

    def _probe(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.probe_timeout)
            try:
                connection.request("GET", "/health")
                response = connection.getresponse()
                body = response.read()
                self.latencies.append(time.perf_counter() - started)
                if response.status == 200:
                    self.max_batch = max(self.max_batch, json.loads(body)["batch_size"])
                else:
                    self.failed += 1
            except OSError:  # no answer in time, or refused
                self.latencies.append(max(time.perf_counter() - started, self.probe_timeout))
                self.failed += 1
            finally:
                connection.close()
            self._stop.wait(0.1)

    def _memory(self) -> None:
        import psutil

        root = psutil.Process(self.server.process.pid)
        while not self._stop.is_set():
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak_rss_mb = max(self.peak_rss_mb, rss / 2**20)
            except psutil.Error:
                pass
            self._stop.wait(0.25)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Row:
    scenario: str
    health_p50_ms: float
    health_p99_ms: float
    health_failed: int
    statuses: str
    refusal_p50_s: float | None
    longest_wait_s: float | None
    max_batch: int
    peak_rss_mb: float
    notes: list[str] = field(default_factory=list)


def summarize(name: str, watch: Watch, outcomes: list[Outcome], notes: list[str]) -> Row:
    statuses = collections.Counter(o.status for o in outcomes)
    refusals = [o.first for o in outcomes if o.refused and o.first is not None]
    waits = [o.first if o.first is not None else o.total for o in outcomes if (o.first or o.total) is not None]
    row = Row(
        scenario=name,
        health_p50_ms=watch.percentile(0.5) * 1000,
        health_p99_ms=watch.percentile(0.99) * 1000,
        health_failed=watch.failed,
        statuses=" ".join(f"{k}:{v}" for k, v in sorted(statuses.items())) or "-",
        refusal_p50_s=statistics.median(refusals) if refusals else None,
        longest_wait_s=max(waits) if waits else None,
        max_batch=watch.max_batch,
        peak_rss_mb=watch.peak_rss_mb,
        notes=notes,
    )
    print(f"  {name}: /health p50 {row.health_p50_ms:.1f} ms, p99 {row.health_p99_ms:.1f} ms "
          f"({row.health_failed} failed of {len(watch.latencies)}); {row.statuses}; "
          f"longest wait {_s(row.longest_wait_s)}; max batch {row.max_batch}; {'; '.join(notes)}", flush=True)
    return row


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


# ---- the scenarios ------------------------------------------------------------------------------

def scenario_idle(server, port, args) -> Row:
    generate_once(port)  # warm-up
    alone = statistics.median(generate_once(port) for _ in range(3))
    sockets = []
    with Watch(server, port, args.probe_timeout) as watch:
        opened_at = time.monotonic()
        for _ in range(args.idle_sockets):
            sock = socket.socket()
            sock.settimeout(5)
            try:
                sock.connect(("127.0.0.1", port))
            except OSError:
                sock.close()
                break
            sockets.append(sock)
        held = []
        closed_by_server: list[float] = []
        while time.monotonic() - opened_at < args.idle_hold:
            try:
                held.append(generate_once(port, timeout=args.probe_timeout))
            except (OSError, RuntimeError):
                held.append(float(args.probe_timeout))
            time.sleep(0.5)
        for sock in sockets:  # which ones the server closed (EOF waiting), and which are still open
            sock.setblocking(False)
            try:
                if sock.recv(1) == b"":
                    closed_by_server.append(1)
            except BlockingIOError:
                pass
            except OSError:
                closed_by_server.append(1)
            sock.close()
    during = statistics.median(held) if held else float("nan")
    notes = [f"{len(sockets)} idle sockets held {args.idle_hold:g} s, {len(closed_by_server)} closed by the server",
             f"ordinary request {alone * 1000:.0f} ms alone, {during * 1000:.0f} ms (median of {len(held)}) "
             f"with them held ({during / alone:.2f}x)"]
    return summarize("idle", watch, [], notes)


def scenario_slow(server, port, args) -> Row:
    request = b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + \
        b"X-Padding: " + b"x" * 200 + b"\r\n\r\n"
    closed_after: list[float] = []
    lock = threading.Lock()

    def slow_client() -> None:
        sock = socket.socket()
        started = time.monotonic()
        try:
            sock.connect(("127.0.0.1", port))
            for byte in request:
                if time.monotonic() - started > args.slow_seconds:
                    return
                sock.sendall(bytes([byte]))
                time.sleep(args.slow_interval)
                sock.setblocking(False)
                try:
                    if sock.recv(4096) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
        except OSError:
            with lock:
                closed_after.append(time.monotonic() - started)
        finally:
            sock.close()

    with Watch(server, port, args.probe_timeout) as watch:
        threads = [threading.Thread(target=slow_client, daemon=True) for _ in range(args.slow_clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(args.slow_seconds + 30)
    notes = [f"{args.slow_clients} clients, 1 byte every {args.slow_interval:g} s for at most {args.slow_seconds:g} s: "
             f"{len(closed_after)} closed by the server"
             + (f" after {min(closed_after):.1f} to {max(closed_after):.1f} s" if closed_after else "")]
    return summarize("slow", watch, [], notes)


def scenario_clients(name: str, count: int, new_tokens: int):
    def run(server, port, args) -> Row:
        texts = prompts(1, seed=count)
        body = {"text": {"plain": texts[0]}, "max_new_tokens": new_tokens, "do_sample": True, "top_k": 50, "seed": 7}
        with Watch(server, port, args.probe_timeout) as watch:
            started = time.perf_counter()
            outcomes = run_clients(port, count, body, args.client_timeout)
            wall = time.perf_counter() - started
        return summarize(name, watch, outcomes, [f"{count} clients x {new_tokens} tokens, done in {wall:.1f} s"])
    return run


# ---- main ---------------------------------------------------------------------------------------

def health(port: int) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/health")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def print_table(rows: list[Row]) -> None:
    print()
    print("| scenario | /health p50 ms | /health p99 ms | probes failed | statuses | refusal p50 | longest wait "
          "| max batch | peak RSS MB |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.scenario} | {r.health_p50_ms:.1f} | {r.health_p99_ms:.1f} | {r.health_failed} | {r.statuses} | "
              f"{_s(r.refusal_p50_s)} | {_s(r.longest_wait_s)} | {r.max_batch} | {r.peak_rss_mb:.0f} |")
    for r in rows:
        for note in r.notes:
            print(f"- {r.scenario}: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=pathlib.Path, default=ROOT / ".cache" / "bench-gpt2-ascii")
    parser.add_argument("--port", type=int, default=49180)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--idle-sockets", type=int, default=1000)
    parser.add_argument("--idle-hold", type=float, default=60, help="seconds the idle sockets are held")
    parser.add_argument("--slow-clients", type=int, default=64)
    parser.add_argument("--slow-interval", type=float, default=0.5, help="seconds between two bytes of a slow client")
    parser.add_argument("--slow-seconds", type=float, default=30, help="most seconds a slow client keeps sending")
    parser.add_argument("--stream-tokens", type=int, default=32, help="new tokens of each stream (streams scenario)")
    parser.add_argument("--flood", type=int, default=200, help="clients of the flood scenarios")
    parser.add_argument("--flood-tokens", type=int, default=16, help="new tokens of each flood and burst request")
    parser.add_argument("--client-timeout", type=float, default=120, help="most seconds a client waits for its answer")
    parser.add_argument("--probe-timeout", type=float, default=10, help="most seconds a /health probe waits")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = physical cores)")
    args = parser.parse_args(argv)

    # A thousand idle sockets and hundreds of clients need more descriptors than the usual 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.idle_sockets + args.flood + 512
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))

    model_dir = make_model(args.model_dir)
    env = {"QUEUE_TIMEOUT": "60"}
    if args.threads:
        env["TORCH_THREADS"] = str(args.threads)
    plans = [
        ({}, [s for s in ("idle", "slow", "streams", "flood-default") if s in args.scenarios]),
        ({"MAX_QUEUE": "8"}, [s for s in ("flood-queue8", "burst") if s in args.scenarios]),
    ]
    rows = []
    for extra, names in plans:
        if not names:
            continue
        if not port_is_free(args.port):  # else the figures would be another server's
            print(f"error: something already listens on 127.0.0.1:{args.port}; pick another --port", file=sys.stderr)
            return 2
        server = RunningServer(model_dir, args.port, {**env, **extra})
        try:
            limits = health(args.port)
            rows_in_batch, max_queue = limits["max_batch_size"], int(extra.get("MAX_QUEUE", 128))
            print(f"server: {model_dir.name}, batch rows {rows_in_batch}, MAX_QUEUE {max_queue}, "
                  f"versions {limits.get('versions', {}).get('gunicorn', '?')}", flush=True)
            runners = {
                "idle": scenario_idle,
                "slow": scenario_slow,
                "streams": scenario_clients("streams", 2 * rows_in_batch, args.stream_tokens),
                "flood-default": scenario_clients("flood-default", args.flood, args.flood_tokens),
                "flood-queue8": scenario_clients("flood-queue8", args.flood, args.flood_tokens),
                "burst": scenario_clients("burst", rows_in_batch + max_queue, args.flood_tokens),
            }
            for name in names:
                rows.append(runners[name](server, args.port, args))
        finally:
            server.stop()
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
