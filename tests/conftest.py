"""Shared fixtures: tiny real models in a Hugging Face cache, the API in process, and the real server.

The tiny models are made offline by `scripts/make_tiny_models.py` and installed into a private
`HF_HOME` by `scripts/prefetch_model.py --from-folder` under repo ids, so the server loads them by
id with `HF_HUB_OFFLINE=1` exactly as it loads a prefetched hub model in production.

Two tiers of API tests:
- in process (`api`, `make_api`; `live_api`, `make_live_api` over HTTP; `inprocess_openai`): apps
  that share one real engine per model, which `create_app` built and loaded (from the model's folder,
  as MODEL_ID=/a/folder does); fast, no subprocess, for everything that does not need gunicorn, a
  client's disconnect, a signal or a process of its own. Settings that change the engine (dtype,
  quantization, memory, batch and queue limits) get an app built with an engine of its own from
  them (`inprocess_server`), as a worker of `python -m app` builds it;
- a real server (`start_server`, `gpt2_server`, `one_at_a_time_server`): `python -m app` under
  gunicorn, for client libraries over real HTTP, disconnects, signals, boot refusals and process-wide
  settings. Tests that use the same settings share one server (`start_server(shared=True, ...)`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARCHITECTURES = ("gpt2", "gpt-neo", "gptj")
REPO_IDS = {arch: f"test-org/tiny-{arch}" for arch in ARCHITECTURES}


@dataclass
class TinyModels:
    hf_home: pathlib.Path
    folders: dict[str, pathlib.Path]  # architecture -> save_pretrained folder
    repo_ids: dict[str, str]  # architecture -> repo id in hf_home


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    base = tmp_path_factory.mktemp("tiny-models")
    hf_home = base / "hf-home"
    subprocess.run([sys.executable, str(ROOT / "scripts/make_tiny_models.py"), str(base / "folders")],
                   check=True, capture_output=True)
    folders = {arch: base / "folders" / arch for arch in ARCHITECTURES}
    for arch, folder in folders.items():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts/prefetch_model.py"), "--from-folder", str(folder),
             "--cache-dir", str(hf_home / "hub"), REPO_IDS[arch]],
            check=True, capture_output=True,
        )
    return TinyModels(hf_home=hf_home, folders=folders, repo_ids=dict(REPO_IDS))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout: float = 10.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def batch_size(url: str) -> int:
    """Sequences the server is decoding right now, as /health reports them."""
    return requests.get(url + "/health", timeout=5).json()["batch_size"]


def wait_for_exit(server: "Server", timeout: float = 120) -> int:
    """The exit status of a server expected to stop by itself (a boot refusal, say)."""
    assert wait_until(lambda: server.process.poll() is not None, timeout), f"the server did not stop:\n{server.log}"
    return server.process.returncode


class Server:
    """A real server process: `python -m app` with the given environment."""

    def __init__(self, env: dict[str, str], cwd: pathlib.Path, log_path: pathlib.Path):
        self.port = int(env["PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app"], env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy loading
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log}")

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30) -> int:
        self.process.terminate()  # SIGTERM, unless it has exited
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """End the server and its worker at once, for a test that has checked everything it wanted
        before (a graceful stop would wait for the requests it left running)."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._log.close()


def stop_all(servers: list[Server], timeout: float = 30) -> None:
    """SIGTERM every server still running at once, then wait for each (the slowest bounds the wait)."""
    for server in servers:
        server.process.terminate()
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(timeout)


def settings_key(settings: dict) -> tuple:
    """The settings as a key of the servers built from them (names in any case, values as text)."""
    return tuple(sorted((name.upper(), str(value)) for name, value in settings.items()))


def server_env(tiny_models: TinyModels, **settings) -> dict[str, str]:
    """Environment for a server on a free port serving tiny GPT-2 unless told otherwise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SRVREST_", "MODEL_", "API_KEY"))}
    env.update(
        PYTHONPATH=str(ROOT),
        HF_HOME=str(tiny_models.hf_home),
        MODEL_ID=tiny_models.repo_ids["gpt2"],
        HOST="127.0.0.1",
        PORT=str(free_port()),
        TORCH_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update({key.upper(): str(value) for key, value in settings.items()})
    return env


@pytest.fixture(scope="session")
def start_server(tiny_models, tmp_path_factory):
    """Factory: `start_server(MODEL_ID=..., MAX_QUEUE=...)` starts a server and waits until it is ready.

    `start_server(shared=True, ...)` gives the server already running with exactly these settings, if
    there is one, else starts it: tests that use the same settings share one process (a test that ends
    its server, say with SIGTERM, leaves the next one a fresh server).
    Every server started this way is stopped at the end of the session; stop one earlier with `.stop()`.
    The working directory is an empty folder, so the repository's `.env` does not apply.
    """
    started: list[Server] = []
    by_settings: dict[tuple, Server] = {}  # the shared servers

    def start(wait: bool = True, cwd: pathlib.Path | None = None, shared: bool = False, **settings) -> Server:
        key = settings_key(settings)
        if shared and key in by_settings and by_settings[key].running:
            return by_settings[key].wait_ready() if wait else by_settings[key]
        run_dir = cwd or tmp_path_factory.mktemp("server")
        server = Server(server_env(tiny_models, **settings), run_dir, run_dir / "server.log")
        started.append(server)
        if shared:
            by_settings[key] = server
        return server.wait_ready() if wait else server

    yield start
    stop_all(started)


@pytest.fixture(scope="module")
def boot_early(request, start_server):
    """`boot_early(user, **settings)`: if a selected test of this module is or uses `user` (a test or a
    fixture that takes its server with `start_server(shared=True, **settings)`), start that server now
    without waiting for it: it boots on a spare core while the module's earlier tests run."""
    users = {name for item in request.session.items if item.module is request.module
             for name in (item.originalname, *item.fixturenames)}

    def boot(user: str, **settings) -> None:
        if user in users:
            start_server(wait=False, shared=True, **settings)

    return boot


# Idle sockets stay open for as long as a test needs (10 minutes): the server test_connections and
# test_shutdown share for idle connections.
PATIENT = {"HEADER_TIMEOUT": 600}

ONE_AT_A_TIME_KEY = "test-secret-key"
ONE_AT_A_TIME = {"MAX_BATCH_SIZE": 1, "MAX_QUEUE": 1, "API_KEY": ONE_AT_A_TIME_KEY}


@pytest.fixture
def one_at_a_time_server(start_server) -> Server:
    """A shared server with one place in the batch and one in the queue, that wants an API key
    (ONE_AT_A_TIME_KEY): refusals, waits and cancellations happen there at will."""
    return start_server(shared=True, **ONE_AT_A_TIME)


@pytest.fixture(scope="session", autouse=True)
def _boot_shared_servers_early(request):
    """The servers many modules share boot in the background from the session's first test, if a
    selected test uses them."""
    used = {name for item in request.session.items for name in item.fixturenames}
    if "one_at_a_time_server" in used:
        request.getfixturevalue("start_server")(wait=False, shared=True, **ONE_AT_A_TIME)
    if "gpt2_server" in used:
        request.getfixturevalue("start_server")(wait=False, shared=True)


@pytest.fixture
def gpt2_server(start_server) -> Server:
    """One shared server with tiny GPT-2 and default settings, for tests that do not change settings
    (started again if a test ended it)."""
    return start_server(shared=True)


# ---- the API in process ---------------------------------------------------------------------------


def inprocess_settings(tiny_models: TinyModels, **settings):
    """Settings for an in-process app on tiny GPT-2, ignoring the repository's `.env`."""
    from app.settings import load_settings

    defaults = {"model_id": str(tiny_models.folders["gpt2"]), "torch_threads": 1, "device": "cpu"}
    return load_settings(_env_file=None, **{**defaults, **{k.lower(): v for k, v in settings.items()}})


def loaded_app(settings) -> Flask:
    """The app `create_app(settings)` builds with an engine of its own, once that engine has loaded the model."""
    from app.factory import create_app

    app = create_app(settings, exit_on_load_failure=False)
    engine = app.extensions["engine"]
    assert wait_until(lambda: engine.state != "loading", 120), f"the in-process engine for {settings.model_id} did not load"
    assert engine.ready, f"the in-process engine for {settings.model_id} failed: {engine.failure}"
    return app


@pytest.fixture(scope="session")
def inprocess_engines(tiny_models):
    """`inprocess_engines(model_id)`: a real engine, built and loaded by the production factory, one per
    model id for the whole session (a model folder: the HF cache's location is fixed at import)."""
    engines = {}

    def get(model_id: str):
        if model_id not in engines:
            engines[model_id] = loaded_app(inprocess_settings(tiny_models, MODEL_ID=model_id)).extensions["engine"]
        return engines[model_id]

    yield get
    for engine in engines.values():
        engine.stop()
        engine.join(30)


@pytest.fixture(scope="session")
def make_api(tiny_models, inprocess_engines, app_errors):
    """Factory: `make_api(API_KEY="k", MAX_NEW_TOKENS=8)` gives a test client of a fresh app with these
    settings over the shared engine of its MODEL_ID (engine settings such as MAX_QUEUE need an engine of
    their own: `inprocess_server`)."""
    from app.factory import create_app

    def make(**settings) -> FlaskClient:
        resolved = inprocess_settings(tiny_models, **settings)
        app: Flask = create_app(resolved, engine=inprocess_engines(resolved.model_id))
        return app.test_client()

    return make


class LiveApi:
    """An in-process app served over real HTTP on 127.0.0.1 by werkzeug's threaded server, for tests
    that speak HTTP (requests, streaming readers) without a server process of their own."""

    def __init__(self, app: Flask):
        from werkzeug.serving import make_server

        self.app = app
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self._server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        # A short poll interval: `stop` waits for the loop to see it (socketserver's default is 0.5 s).
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         name=f"live-api-{self.port}", daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="session")
def make_live_api(make_api):
    """Factory: `make_live_api(MAX_NEW_TOKENS=8)` serves a fresh in-process app over HTTP (see LiveApi)."""
    started: list[LiveApi] = []

    def make(**settings) -> LiveApi:
        started.append(LiveApi(make_api(**settings).application))
        return started[-1]

    yield make
    for live in started:
        live.stop()


@pytest.fixture(scope="session")
def live_api(make_live_api) -> LiveApi:
    """The default in-process app over HTTP."""
    return make_live_api()


class LogLines(logging.Handler):
    """Every record logged while it is installed, as the server's text log shows it."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class InProcessServer:
    """An app that `create_app(settings)` built with an engine of its own, which loaded the model as a
    worker of `python -m app` does (fit check, dtype, quantization, batch limits from these settings):
    `client` (a Flask test client), `url` (the app over real HTTP, see LiveApi), and `log`, the lines
    the app logged while it was built and its model loaded."""

    def __init__(self, settings):
        lines, app_logger = LogLines(), logging.getLogger("app")
        level = app_logger.level
        app_logger.addHandler(lines)
        app_logger.setLevel(logging.INFO)  # the server logs at INFO by default; pytest leaves WARNING
        try:
            self.app = loaded_app(settings)
        finally:
            app_logger.removeHandler(lines)
            app_logger.setLevel(level)
        self.engine = self.app.extensions["engine"]
        self.settings = self.app.extensions["settings"]
        self.log = "\n".join(lines.lines)
        self._live: LiveApi | None = None
        self._stopped = False

    @property
    def client(self) -> FlaskClient:
        return self.app.test_client()

    @property
    def url(self) -> str:
        if self._live is None:
            self._live = LiveApi(self.app)
        return self._live.url

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._live is not None:
            self._live.stop()
        self.engine.stop()
        self.engine.join(30)

    def inject_faults(self, **faults) -> None:
        """tests/faults' FAULT_* for this engine's model alone, e.g. `inject_faults(at_length=60)`:
        its forward pass raises where a real fault would surface (see tests/faults/sitecustomize.py)."""
        from tests.faults.sitecustomize import raise_injected_fault

        model = self.engine.loaded.model
        forward = model.forward

        def faulty_forward(*args, **kwargs):
            raise_injected_fault(kwargs.get("input_ids"), kwargs.get("attention_mask"), **faults)
            return forward(*args, **kwargs)

        model.forward = faulty_forward  # an attribute of this model only: other engines are untouched


@pytest.fixture(scope="session")
def inprocess_server(tiny_models):
    """Factory: `inprocess_server(MODEL_ID=folder, QUANTIZE="int8")` gives an InProcessServer built from
    these settings (on tiny GPT-2 unless told otherwise), for settings that change the engine (dtype,
    quantization, memory, batch and queue limits). One per distinct settings for the session;
    `fresh=True` builds one of the test's own (one whose model a test alters). Or pass `settings=`
    already loaded (`load_settings()` as `python -m app` calls it)."""
    servers: list[InProcessServer] = []
    by_settings: dict[tuple, InProcessServer] = {}  # the shared ones

    def get(fresh: bool = False, settings=None, **values) -> InProcessServer:
        key, shared = settings_key(values), not fresh and settings is None
        if shared and key in by_settings:
            return by_settings[key]
        if settings is None:
            settings = inprocess_settings(tiny_models, **{
                name: str(value) if isinstance(value, pathlib.Path) else value for name, value in values.items()})
        server = InProcessServer(settings)
        servers.append(server)
        if shared:
            by_settings[key] = server
        return server

    yield get
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


class ErrorRecords(logging.Handler):
    """ERROR (and worse) records the app logged during the session: a bad input must never log one."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[str]:
        return [self.format(record) for record in self.records]


@pytest.fixture(scope="session")
def app_errors():
    handler = ErrorRecords()
    logging.getLogger("app").addHandler(handler)
    yield handler
    logging.getLogger("app").removeHandler(handler)


def inprocess_openai(flask_client: FlaskClient, api_key: str = "unused", **options):
    """The official openai client over an in-process app: its HTTP client calls the app's WSGI interface."""
    import httpx2
    import openai

    options.setdefault("max_retries", 0)  # an error must reach the test at once, not after a back-off
    transport = httpx2.WSGITransport(app=flask_client.application)
    return openai.OpenAI(base_url="http://in-process/v1", api_key=api_key,
                         http_client=httpx2.Client(transport=transport), **options)


@pytest.fixture(scope="session")
def api(make_api) -> FlaskClient:
    """A test client of one app with default settings over the shared engine."""
    return make_api()


@pytest.fixture(scope="session")
def client(api):
    """The official openai client, in process, over `api`."""
    return inprocess_openai(api)


@pytest.fixture(scope="session")
def model(client) -> str:
    """The served model's id, as the client discovers it."""
    return client.models.list().data[0].id


def pytest_collection_modifyitems(config, items):
    """Tests that build and start container images (marked `docker`, minutes each) run after the rest,
    so that a quick failure elsewhere shows first."""
    items.sort(key=lambda item: item.get_closest_marker("docker") is not None)
