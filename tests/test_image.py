"""The deployment bundle for real: lint the Dockerfiles, validate compose.yaml, run the README's quick
start literally (its first `docker compose` command with `--wait`, its first curl example, then
`docker compose down`), swap the model, and build the CUDA image with the real CUDA build of torch.

Skipped only when no Docker engine answers `docker info`. Everything else these tests use (hadolint,
the compose v2 and buildx plugins, a local base image, wheelhouses and a model folder for offline
builds) is set up on a Debian machine by `scripts/ci_docker_setup.sh --cuda` (as root).

Build inputs, each overridable from the environment:
  BASE_IMAGE   default: local/python-base:3.11 when that image exists, else the Dockerfiles'
               public default (pulled from the registry)
  WHEELHOUSE   default: build/wheelhouse/cpu when it holds a torch wheel (a fully offline build),
               else none (packages from the package index)
The models are tiny ones made by `scripts/make_tiny_models.py` and baked in from the build context
(MODEL_SOURCE, no MODEL_ID: served as local/<folder name>), so no model hub is needed either.

Dockerfile.cuda is built from build/cuda-wheels (PyPI's CUDA build of torch, made by
`scripts/ci_docker_setup.sh --cuda`), served as a package index by pypiserver, and started without
a GPU: DEVICE=cuda must be refused, DEVICE=auto must serve on the CPU. Running it on a GPU is
`scripts/gpu_check.py`'s job.

Measurements (image sizes, build and rebuild times, bytes a model swap adds, time to healthy) are
printed, never asserted on time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
LOCAL_BASE_IMAGE = "local/python-base:3.11"
MODELS_DIR = "build/models/image-test"  # in the build context (see .dockerignore)
CUDA_WHEELS = "build/cuda-wheels"  # outside it: served as a package index
ARCHS = ("gpt2", "gpt-neo")
SERVED = {arch: f"local/{arch}" for arch in ARCHS}  # the name a MODEL_SOURCE folder is served under
CONTAINER_PORT = 49151
README_PORT = 49151
PROMPT = "When Konrad Adenauer was elected chancellor in"
EXAMPLE = {  # the original project's examples/text.json
    "text": {"plain": PROMPT},
    "do_sample": True,
    "top_p": 100,
    "top_k": 50,
    "temperature": 0.6,
    "max_length": 128,
    "num_return_sequences": 3,
}


def _engine_answers() -> tuple[bool, str]:
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return False, "no docker client on PATH"
    except subprocess.TimeoutExpired:
        return False, "`docker info` did not answer within 60 s"
    if info.returncode != 0:
        return False, "no Docker engine answers `docker info` (scripts/ci_docker_setup.sh starts one)"
    return True, ""


_ENGINE_OK, _ENGINE_REASON = _engine_answers()
pytestmark = [pytest.mark.docker, pytest.mark.skipif(not _ENGINE_OK, reason=_ENGINE_REASON)]


# ------------------------------------------------------------------------------------------ helpers


def run(cmd: list[str], *, env: dict | None = None, timeout: float = 300, check: bool = True,
        log: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command in the repository root; on failure, fail the test with the end of its output."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if check and proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"`{' '.join(cmd)}` exited {proc.returncode}:\n{output}", pytrace=False)
    return proc


def report(request: pytest.FixtureRequest, line: str) -> None:
    """Print a measurement so that it shows in the test run's output even with capture on."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        print(f"[image] {line}")
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"[image] {line}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def image_exists(name: str) -> bool:
    return run(["docker", "image", "inspect", name], check=False).returncode == 0


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/ci_docker_setup.sh installs it)", pytrace=False)
    return path


def compose_available() -> None:
    if run(["docker", "compose", "version"], check=False).returncode != 0:
        pytest.fail("the docker compose v2 plugin is missing (scripts/ci_docker_setup.sh installs it)",
                    pytrace=False)


# ------------------------------------------------------------------------------------------ lint and config


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_passes_hadolint(dockerfile):
    proc = run([tool("hadolint"), "--failure-threshold", "warning", dockerfile], check=False)
    assert proc.returncode == 0, f"hadolint {dockerfile}:\n{proc.stdout}{proc.stderr}"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user who has set nothing: .env alone decides (profile, port, ...)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("COMPOSE_", "MODEL_", "HF_", "DOCKER_BUILDKIT"))
           and k not in ("BIND_ADDRESS", "PORT", "WHEELHOUSE", "BASE_IMAGE", "IMAGE_NAME", "TORCH_CUDA")}
    env.update(extra)
    return env


def compose_config(env: dict[str, str]) -> dict:
    compose_available()
    return json.loads(run(["docker", "compose", "config", "--format", "json"], env=env).stdout)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_config_is_valid(profile):
    # cpu: .env's COMPOSE_PROFILES alone, no --profile; gpu: what a GPU user sets in the shell.
    env = clean_env(**({"COMPOSE_PROFILES": "gpu"} if profile == "gpu" else {}))
    run(["docker", "compose", "config", "--quiet"], env=env)
    services = compose_config(env)["services"]
    assert list(services) == [f"server-{profile}"], "each profile runs exactly one service"
    service = services[f"server-{profile}"]
    assert service["build"]["dockerfile"] == {"cpu": "Dockerfile.cpu", "gpu": "Dockerfile.cuda"}[profile]
    assert {"MODEL_ID", "MODEL_REVISION", "MODEL_SOURCE", "WHEELHOUSE"} <= set(service["build"]["args"])
    [port] = service["ports"]
    assert port["target"] == CONTAINER_PORT and port["published"] == str(README_PORT)
    assert port["host_ip"] == "127.0.0.1", "published on the loopback address by default"
    assert service["environment"]["PUBLISHED_ADDRESS"] == "127.0.0.1"
    assert any(v["type"] == "volume" and v["target"] == "/models" for v in service["volumes"])
    assert service["environment"]["HF_HOME"] == "/models"
    assert service["environment"]["HF_HUB_OFFLINE"] == "1"
    assert service["restart"] == "unless-stopped"
    assert service["deploy"]["resources"]["limits"]["memory"]
    devices = service["deploy"]["resources"].get("reservations", {}).get("devices", [])
    if profile == "gpu":
        assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]
    else:
        assert devices == []


# ------------------------------------------------------------------------------------------ the README


def readme_quick_start() -> tuple[list[str], str]:
    """The README quick start's first `docker compose ... up` command and its first curl example."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Quick start\n(.*?)^## ", text, re.S | re.M)
    assert match, "README.md has no '## Quick start' section"
    section = match.group(1).replace("\\\n", " ")
    up = next((line.split("#")[0].strip() for line in section.splitlines()
               if re.match(r"\s*docker compose\b.*\bup\b", line)), None)
    curl = next((line.strip() for line in section.splitlines() if line.strip().startswith("curl ")), None)
    assert up and curl, "the quick start shows no `docker compose ... up` command or no curl example"
    return shlex.split(up), curl


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def history(image: str) -> list[tuple[str, str, int]]:
    """The image's build steps, oldest first: (created, command, bytes)."""
    proc = run(["docker", "history", "--no-trunc", "--human=false", "--format",
                "{{.CreatedAt}}\t{{.CreatedBy}}\t{{.Size}}", image])
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    return [(created, command, int(size)) for created, command, size in reversed(rows)]


def added_bytes(old: str, new: str) -> tuple[int, list[str]]:
    """Bytes of the layers `new` does not share with `old`, and the steps that made them."""
    old_steps, new_steps = history(old), history(new)
    shared = 0
    while shared < min(len(old_steps), len(new_steps)) and old_steps[shared] == new_steps[shared]:
        shared += 1
    rest = new_steps[shared:]
    return sum(size for *_, size in rest), [command[-90:] for _, command, size in rest if size]


def image_size(image: str) -> int:
    return int(run(["docker", "image", "inspect", "--format", "{{.Size}}", image]).stdout)


@dataclass
class Project:
    """A compose project driven with the README's own commands, in the repository's folder."""

    env: dict[str, str]
    up_command: list[str]
    curl: str
    port: int
    images: list[str] = field(default_factory=list)

    def compose(self, *args: str, check: bool = True, timeout: float = 600, **extra: str):
        return run(["docker", "compose", *args], env={**self.env, **extra}, check=check, timeout=timeout)

    def up(self, request, what: str, **extra: str) -> float:
        """The README's command with --wait; returns its wall time (build included)."""
        env = {**self.env, **extra}
        started = time.monotonic()
        proc = run([*self.up_command, "--wait", "--wait-timeout", "600"], env=env, check=False, timeout=2400)
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            logs = self.compose("logs", "--no-color", check=False).stdout[-6000:]
            pytest.fail(f"`{shlex.join(self.up_command)} --wait` exited {proc.returncode}:\n"
                        f"{(proc.stdout + proc.stderr)[-4000:]}\ncontainer log:\n{logs}", pytrace=False)
        image = self.service()["Image"]
        self.images.append(run(["docker", "image", "inspect", "--format", "{{.Id}}", image]).stdout.strip())
        report(request, f"{what}: `{shlex.join(self.up_command)} --wait` built and healthy in {seconds:.1f} s; "
                        f"image {image_size(image) / 1e9:.2f} GB")
        return seconds

    def service(self) -> dict:
        out = self.compose("ps", "--format", "json").stdout.strip()
        rows = json.loads(out) if out.startswith("[") else [json.loads(line) for line in out.splitlines()]
        assert len(rows) == 1, rows
        return rows[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def models():
    folder = ROOT / MODELS_DIR
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, "scripts/make_tiny_models.py", str(folder)]
    for arch in ARCHS:
        cmd += ["--only", arch]
    run(cmd)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def base_image_env() -> dict[str, str]:
    """BASE_IMAGE as scripts/ci_docker_setup.sh prints it, where that image exists."""
    base_image = os.environ.get("BASE_IMAGE") or (LOCAL_BASE_IMAGE if image_exists(LOCAL_BASE_IMAGE) else "")
    return {"BASE_IMAGE": base_image} if base_image else {}


def offline_build_env() -> dict[str, str]:
    """The offline build variables scripts/ci_docker_setup.sh prints, where their inputs exist."""
    wheelhouse = os.environ.get("WHEELHOUSE")
    if wheelhouse is None:
        folder = "build/wheelhouse/cpu"
        wheelhouse = folder if any((ROOT / folder).glob("torch-*.whl")) else ""
    return {**base_image_env(), "WHEELHOUSE": wheelhouse}


@pytest.fixture(scope="module")
def project(models, request):
    """`docker compose up --build` as the README shows it, with a tiny GPT-2 folder as the model."""
    compose_available()
    run(["docker", "buildx", "version"])  # compose builds with buildx; ci_docker_setup.sh installs it
    up, curl = readme_quick_start()
    # The README's port when it is free here; else another, in both the command's env and the curl.
    port = README_PORT if port_is_free(README_PORT) else free_port()
    name = f"hgpt-test-{uuid.uuid4().hex[:8]}"
    env = clean_env(COMPOSE_PROJECT_NAME=name, IMAGE_NAME=name, MODEL_SOURCE=f"{MODELS_DIR}/gpt2",
                    **offline_build_env())
    if port != README_PORT:
        env["PORT"] = str(port)
        curl = curl.replace(f"localhost:{README_PORT}", f"localhost:{port}")
    proj = Project(env=env, up_command=up, curl=curl, port=port)
    try:
        proj.up(request, "the README's command, tiny GPT-2 from build/models")
        yield proj
    finally:
        proj.compose("down", "--volumes", "--remove-orphans", "--timeout", "30", check=False)
        for image in [*proj.images, f"{name}:cpu"]:  # the tag too: a build whose start failed
            run(["docker", "image", "rm", "--force", image], check=False)


@pytest.mark.slow
def test_readme_first_curl_example_answers(project):
    proc = run(["bash", "-c", project.curl], timeout=300)
    body = json.loads(proc.stdout)
    assert body["model"] == SERVED["gpt2"], "a MODEL_SOURCE build without MODEL_ID is served under the folder's name"
    [sentence] = body["sentences"]
    assert sentence["generated_text"].startswith("When Konrad Adenauer was elected chancellor in")


@pytest.mark.slow
def test_server_does_not_run_as_root(project):
    uid = project.compose("exec", "-T", "server-cpu", "id", "-u").stdout.strip()
    assert uid.isdigit() and uid != "0", uid
    status = project.compose("exec", "-T", "server-cpu", "cat", "/proc/1/status").stdout
    [uids] = [line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")]
    assert "0" not in uids, f"the server process (pid 1) runs with uids {uids}"


@pytest.mark.slow
def test_the_server_allocates_with_jemalloc(project):
    """The entrypoint preloads jemalloc, which gives freed memory back: the master and its worker
    both have it mapped."""
    maps = project.compose("exec", "-T", "server-cpu", "sh", "-c",
                           "for m in /proc/[0-9]*/maps; do grep -l libjemalloc \"$m\"; done; true").stdout.split()
    holders = {path.split("/")[2] for path in maps}
    pids = project.compose("exec", "-T", "server-cpu", "sh", "-c",
                           "grep -l 'python' /proc/[0-9]*/cmdline").stdout.split()
    servers = {path.split("/")[2] for path in pids}
    assert len(servers & holders) >= 2, f"jemalloc is mapped in {sorted(holders)}, the server's processes are {sorted(servers)}"


@pytest.mark.slow
def test_cpu_image_is_offline_and_cpu_only(project, request):
    image = project.service()["Image"]
    config = json.loads(run(["docker", "image", "inspect", image]).stdout)[0]["Config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["HF_HOME"] == "/models"
    assert config["User"] and config["User"].split(":")[0] not in ("", "0", "root")
    assert config["Healthcheck"]["Test"] == ["CMD", "healthcheck"]
    assert config["Cmd"] == ["python", "-m", "app"]
    torch = project.compose("exec", "-T", "server-cpu", "python", "-c",
                            "import torch; print(torch.__version__, torch.version.cuda)").stdout.split()
    assert torch[1] == "None", f"the CPU image has a CUDA build of torch: {torch}"
    size = image_size(image)
    report(request, f"CPU image: torch {torch[0]}, {size / 1e9:.2f} GB ({size / 2**30:.2f} GiB) with a tiny model")
    assert size < 2.5e9, f"the CPU image is {size / 1e9:.1f} GB: the CPU-only torch should keep it well under"


@pytest.mark.slow
def test_loopback_publishing_gives_no_api_key_warning_and_health_log_is_one_line(project):
    logs = project.compose("logs", "--no-color").stdout
    assert "Listening at" in logs or "loaded model" in logs, logs[-3000:]
    assert "no API key is set" not in logs, "the port is published on 127.0.0.1 only: nothing to warn about"
    container = project.service()["ID"]
    health = json.loads(run(["docker", "inspect", "--format", "{{json .State.Health}}", container]).stdout)
    assert health["Status"] == "healthy"
    for entry in health["Log"]:
        assert entry["Output"].count("\n") <= 1 and entry["Output"].startswith("health: "), entry


@pytest.mark.slow
def test_model_swap_rebuilds_only_the_model_and_leaves_nothing_stale(project, request):
    old_image = project.service()["Image"]
    old_id = run(["docker", "image", "inspect", "--format", "{{.Id}}", old_image]).stdout.strip()
    project.env["MODEL_SOURCE"] = f"{MODELS_DIR}/gpt-neo"
    seconds = project.up(request, "model swap (tiny GPT-Neo), existing volume")
    new_image = project.service()["Image"]
    added, steps = added_bytes(old_id, new_image)
    report(request, f"model swap: rebuilt and healthy in {seconds:.1f} s; new layers {added / 1e6:.1f} MB: "
                    + "; ".join(steps))
    assert not any("/opt/venv" in step and "COPY" in step.upper() for step in steps), steps
    assert added < 50e6, f"a swap of a tiny model added {added / 1e6:.0f} MB of layers: {steps}"
    health = requests.get(f"{project.url}/health", timeout=30).json()
    assert health["model"] == SERVED["gpt-neo"]
    check_generation(project.url, SERVED["gpt-neo"])
    listing = project.compose("exec", "-T", "server-cpu", "ls", "-A", "/models/hub").stdout.split()
    assert listing == ["models--local--gpt-neo"], f"the volume holds {listing}: the old model stayed"
    volume_bytes = int(project.compose("exec", "-T", "server-cpu", "du", "-s", "-B1", "/models").stdout.split()[0])
    assert volume_bytes < 1e6, f"the volume holds {volume_bytes} bytes: weights copied instead of linked"


@pytest.mark.slow
def test_docker_compose_down_stops_it_without_a_profile(project):
    project.compose("down")  # the README's stop command, exactly
    assert project.compose("ps", "--all", "--quiet").stdout.strip() == ""
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{project.url}/health", timeout=10)


def check_generation(url: str, model_id: str) -> None:
    response = requests.post(f"{url}/generate", json=EXAMPLE, timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model_id
    assert isinstance(body["s_elapsed"], str) and re.fullmatch(r"\d+\.\d{2}", body["s_elapsed"]), body
    assert len(body["sentences"]) == 3
    for sentence in body["sentences"]:
        assert sentence["generated_text"].startswith(PROMPT), sentence


# ------------------------------------------------------------------------------------------ plain docker run


def start_container(image: str, *env: str) -> tuple[str, int]:
    port = free_port()
    name = f"hgpt-test-{uuid.uuid4().hex[:8]}"
    args = [item for pair in (("--env", e) for e in env) for item in pair]
    run(["docker", "run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:{CONTAINER_PORT}",
         *args, image])
    return name, port


def first_health_answer(port: int, limit: float = 120) -> tuple[float, int]:
    """Seconds from now until /health first answers, and its status."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            status = requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
            return time.monotonic() - started, status
        except requests.RequestException:
            time.sleep(0.05)
    pytest.fail(f"/health did not answer within {limit} s", pytrace=False)


def wait_healthy(name: str, limit: float = 600) -> str:
    started, status = time.monotonic(), ""
    while time.monotonic() - started < limit and status not in ("healthy", "exited"):
        time.sleep(1)
        state = json.loads(run(["docker", "inspect", "--format", "{{json .State}}", name]).stdout)
        status = "exited" if not state["Running"] else state.get("Health", {}).get("Status", "")
    return status


@pytest.fixture(scope="module")
def cpu_image(project):
    return project.images[0]


@pytest.mark.slow
def test_plain_docker_run_answers_health_at_once_and_warns_when_published_everywhere(cpu_image, request):
    # `docker run -p` without PUBLISHED_ADDRESS: the server cannot tell, so it warns.
    name, port = start_container(cpu_image)
    try:
        seconds, status = first_health_answer(port)
        report(request, f"plain `docker run`: first /health answer ({status}) {seconds:.2f} s after start")
        assert status in (200, 503)
        assert wait_healthy(name) == "healthy"
        logs = run(["docker", "logs", name])
        assert "no API key is set" in logs.stdout + logs.stderr
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=30).json()["model"] == SERVED["gpt2"]
    finally:
        run(["docker", "rm", "--force", "--volumes", name], check=False)


@pytest.mark.slow
def test_read_only_root_filesystem_serves_the_model_from_the_image(cpu_image):
    # As Kubernetes runs it (readOnlyRootFilesystem, no volume on /models): the entry point cannot link
    # the model into the cache, so the server reads it from the image's own copy.
    port = free_port()
    name = f"hgpt-test-{uuid.uuid4().hex[:8]}"
    run(["docker", "run", "--detach", "--name", name, "--read-only", "--tmpfs", "/tmp",
         "--publish", f"127.0.0.1:{port}:{CONTAINER_PORT}", cpu_image])
    try:
        assert wait_healthy(name) == "healthy", run(["docker", "logs", name], check=False).stderr[-4000:]
        logs = run(["docker", "logs", name])
        assert "loading the model from the image" in logs.stderr
        check_generation(f"http://127.0.0.1:{port}", SERVED["gpt2"])
    finally:
        run(["docker", "rm", "--force", "--volumes", name], check=False)


# ------------------------------------------------------------------------------------------ the CUDA image


@contextlib.contextmanager
def package_index(wheelhouse: Path):
    """A package index (pypiserver) of `wheelhouse` on the Docker bridge's gateway, where image builds
    reach it: the build arguments of a mirror (PIP_INDEX_URL, PIP_TRUSTED_HOST). Unlike WHEELHOUSE,
    which copies the wheels into the builder's storage twice (the context, then the wheels stage),
    this stores them nowhere: 5 GB less disk for the CUDA image."""
    gateway = run(["docker", "network", "inspect", "bridge",
                   "--format", "{{(index .IPAM.Config 0).Gateway}}"]).stdout.strip()
    port = free_port()
    url = f"http://{gateway}:{port}/simple/"
    server = subprocess.Popen([sys.executable, "-m", "pypiserver", "run", "--disable-fallback", "--host", gateway,
                               "--port", str(port), "--log-stream", "none", str(wheelhouse)])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(url, timeout=5).raise_for_status()
                break
            except requests.RequestException:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"pypiserver did not answer on {url}", pytrace=False)
                time.sleep(0.2)
        yield {"PIP_INDEX_URL": url, "PIP_TRUSTED_HOST": gateway}
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def cuda_image(models, request):
    build = base_image_env()
    wheels = list((ROOT / CUDA_WHEELS).glob("torch-*.whl"))
    wheelhouse = CUDA_WHEELS if wheels else ""
    if wheels and all("+cpu" in w.name for w in wheels):
        pytest.fail(f"{CUDA_WHEELS} holds no CUDA build of torch", pytrace=False)
    if not wheelhouse and os.environ.get("IMAGE_TEST_CUDA") != "1":
        pytest.skip(f"no {CUDA_WHEELS} (scripts/ci_docker_setup.sh --cuda makes it); "
                    "IMAGE_TEST_CUDA=1 builds from the package index instead (~3 GB)")
    name = f"hgpt-test-{uuid.uuid4().hex[:8]}"
    image = f"{name}:cuda"
    with package_index(ROOT / wheelhouse) if wheelhouse else contextlib.nullcontext({}) as index:
        env = clean_env(COMPOSE_PROFILES="gpu", COMPOSE_PROJECT_NAME=name, IMAGE_NAME=name,
                        MODEL_SOURCE=f"{MODELS_DIR}/gpt2", **build, **index)
        started = time.monotonic()
        run(["docker", "compose", "build"], env=env, timeout=3600)
        seconds = time.monotonic() - started
    source = f"a package index of {wheelhouse}" if wheelhouse else "the package index"
    report(request, f"Dockerfile.cuda from {source}: built in {seconds:.0f} s, "
                    f"image {image_size(image) / 1e9:.2f} GB ({image_size(image) / 2**30:.2f} GiB)")
    try:
        yield image
    finally:
        run(["docker", "image", "rm", "--force", image], check=False)


# The libraries `import torch` loads (libtorch_cuda.so and what it links to) must all resolve. Only
# libtorch_cuda_linalg.so may lack cuSOLVER: torch opens it on the first torch.linalg call on a GPU,
# which the server never makes.
CUDA_PROBE = """
import os, subprocess, torch
lib = os.path.join(os.path.dirname(torch.__file__), "lib")
missing = [line.split()[0] for so in ("libtorch_cuda.so", "libc10_cuda.so", "libtorch_python.so")
           for line in subprocess.run(["ldd", os.path.join(lib, so)], capture_output=True, text=True).stdout.splitlines()
           if "not found" in line]
print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version(), torch.cuda.is_available(),
      ",".join(sorted(set(missing))) or "-", " ".join(torch._C._cuda_getArchFlags().split()))
"""


@pytest.mark.slow
def test_cuda_image_has_torch_built_with_cuda_and_every_library_it_loads(cuda_image, request):
    proc = run(["docker", "run", "--rm", "--entrypoint", "python", cuda_image, "-c", CUDA_PROBE])
    version, cuda, cudnn, available, missing, *archs = proc.stdout.split()
    report(request, f"CUDA image: torch {version}, CUDA {cuda}, cuDNN {cudnn}, GPU here: {available}; "
                    f"kernels for {' '.join(archs)}")
    assert cuda != "None" and cudnn != "None", proc.stdout
    assert missing == "-", f"libraries torch links to are missing from the image: {missing}"
    sizes = run(["docker", "run", "--rm", "--entrypoint", "sh", cuda_image, "-c",
                 "du -sm /opt/venv/lib/python3*/site-packages/* | sort -n | tail -n 6; "
                 "ls /opt/venv/lib/python3*/site-packages | grep -ciE '^triton|cusolver' || true"]).stdout
    report(request, "CUDA image, largest packages (MB): " + " ".join(sizes.split()[:-1]))
    assert sizes.split()[-1] == "0", "triton / cuSOLVER are in the image, though the server never loads them"


@pytest.mark.slow
def test_cuda_image_refuses_device_cuda_without_a_gpu(cuda_image):
    proc = run(["docker", "run", "--rm", "--env", "DEVICE=cuda", cuda_image], check=False, timeout=300)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "DEVICE=cuda" in output and "no CUDA device" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.slow
def test_cuda_image_serves_on_the_cpu_with_device_auto(cuda_image, cpu_image, request):
    name, port = start_container(cuda_image)
    try:
        assert wait_healthy(name) == "healthy", run(["docker", "logs", name], check=False).stderr[-4000:]
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=30).json()
        assert health["model"] == SERVED["gpt2"] and health["device"] == "cpu"
        logs = run(["docker", "logs", name])
        assert " on cpu " in logs.stdout + logs.stderr, "the log says where the model runs"
        check_generation(f"http://127.0.0.1:{port}", SERVED["gpt2"])
        assert run(["docker", "exec", name, "id", "-u"]).stdout.strip() != "0"
        cuda_config, cpu_config = (json.loads(run(["docker", "image", "inspect", i]).stdout)[0]["Config"]
                                   for i in (cuda_image, cpu_image))
        assert cuda_config["User"] == cpu_config["User"]
        assert cuda_config["Healthcheck"] == cpu_config["Healthcheck"]
    finally:
        run(["docker", "rm", "--force", "--volumes", name], check=False)
