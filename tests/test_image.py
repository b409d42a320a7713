"""The deployment bundle for real: lint the Dockerfiles, validate compose.yaml, build the CPU image
offline, run it with `docker compose --profile cpu up --wait`, and talk to it over HTTP.

Skipped only when no Docker engine answers `docker info`. Everything else these tests use (hadolint,
the compose v2 plugin, a BuildKit-capable docker client, a local base image and a wheel folder for
offline builds) is set up on a Debian machine by `scripts/ci_docker_setup.sh` (as root).

Build inputs, each overridable from the environment:
  BASE_IMAGE   default: local/python-base:3.11 when that image exists, else the Dockerfiles'
               public default (pulled from the registry)
  WHEELHOUSE   default: build/wheelhouse when it holds a torch wheel (a fully offline build),
               else none (packages from the package index)
The model is a tiny GPT-2 made by `scripts/make_tiny_models.py` and baked in from the build context
(MODEL_SOURCE) under the repo id test-org/tiny-gpt2, so no model hub is needed either.

Dockerfile.cuda: built with the same inputs when the wheelhouse is used, which means with the CPU
build of torch (the CUDA wheels, ~3 GB, are not in the wheelhouse), and started on the CPU to prove
that the image itself builds and boots. With IMAGE_TEST_CUDA=1 and network access it is built with
the real CUDA wheels instead. Running it on a GPU needs an NVIDIA host and is not tested here.

Measurements (image size, build time, start-to-healthy time) are printed, never asserted on time.
"""

from __future__ import annotations

import json
import os
import re
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
MODELS = {"gpt2": "test-org/tiny-gpt2", "gpt-neo": "test-org/tiny-gpt-neo"}
CONTAINER_PORT = 49151
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


def buildkit_command() -> tuple[list[str], dict[str, str]]:
    """A `docker build` that uses BuildKit (the Dockerfiles use build secrets and bind mounts)."""
    if run(["docker", "buildx", "version"], check=False).returncode == 0:
        return ["docker", "buildx", "build", "--load"], {}
    # Docker clients before 23.0 have BuildKit built in, switched on by DOCKER_BUILDKIT=1 (Debian
    # bookworm's docker.io is one); later ones need the buildx plugin.
    for client in dict.fromkeys(filter(None, [shutil.which("docker"), "/usr/bin/docker"])):
        proc = run([client, "version", "--format", "{{.Client.Version}}"], check=False)
        match = re.match(r"(\d+)\.", proc.stdout.strip())
        if proc.returncode == 0 and match and int(match.group(1)) < 23:
            return [client, "build"], {"DOCKER_BUILDKIT": "1"}
    pytest.fail("no BuildKit-capable docker client: install the docker buildx plugin "
                "(or run scripts/ci_docker_setup.sh)", pytrace=False)


# ------------------------------------------------------------------------------------------ lint and config


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_passes_hadolint(dockerfile):
    proc = run([tool("hadolint"), "--failure-threshold", "warning", dockerfile], check=False)
    assert proc.returncode == 0, f"hadolint {dockerfile}:\n{proc.stdout}{proc.stderr}"


def compose_config(profile: str, env: dict[str, str] | None = None) -> dict:
    compose_available()
    proc = run(["docker", "compose", "--profile", profile, "config", "--format", "json"], env=env)
    return json.loads(proc.stdout)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_config_is_valid(profile):
    compose_available()
    run(["docker", "compose", "--profile", profile, "config", "--quiet"])
    env = {k: v for k, v in os.environ.items() if k not in ("BIND_ADDRESS", "PORT")}
    services = compose_config(profile, env)["services"]
    assert list(services) == [f"server-{profile}"], "each profile runs exactly one service"
    service = services[f"server-{profile}"]
    assert service["build"]["dockerfile"] == {"cpu": "Dockerfile.cpu", "gpu": "Dockerfile.cuda"}[profile]
    assert {"MODEL_ID", "MODEL_REVISION"} <= set(service["build"]["args"])
    [port] = service["ports"]
    assert port["target"] == CONTAINER_PORT
    assert port["host_ip"] == "127.0.0.1", "published on the loopback address by default"
    assert any(v["type"] == "volume" and v["target"] == "/models" for v in service["volumes"])
    assert service["environment"]["HF_HOME"] == "/models"
    assert service["environment"]["HF_HUB_OFFLINE"] == "1"
    assert service["healthcheck"]["test"][0] == "CMD"
    assert service["restart"] == "unless-stopped"
    assert service["deploy"]["resources"]["limits"]["memory"]
    devices = service["deploy"]["resources"].get("reservations", {}).get("devices", [])
    if profile == "gpu":
        assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]
    else:
        assert devices == []


# ------------------------------------------------------------------------------------------ build and run


@dataclass
class Bundle:
    """Build inputs and the compose environment shared by the build and run tests."""

    env: dict[str, str]
    image_name: str
    builder: list[str]
    wheelhouse: str
    logs: Path
    images: list[str] = field(default_factory=list)  # ids of the images built, removed at the end

    def with_model(self, arch: str, **extra: str) -> dict[str, str]:
        return {**self.env, "MODEL_ID": MODELS[arch], "MODEL_SOURCE": f"{MODELS_DIR}/{arch}", **extra}

    def build(self, request, profile: str, arch: str) -> str:
        """Build the image of a compose profile with the build section compose itself resolves."""
        service = compose_config(profile, self.with_model(arch))["services"][f"server-{profile}"]
        build, image = service["build"], service["image"]
        cmd = [*self.builder, "--progress=plain", "-f", build["dockerfile"], "-t", image]
        for key, value in sorted(build.get("args", {}).items()):
            cmd += ["--build-arg", f"{key}={value}"]
        cmd.append(build["context"])
        started = time.monotonic()
        log = self.logs / f"build-{profile}-{arch}.log"
        run(cmd, env=self.env, timeout=1800, log=log)
        seconds = time.monotonic() - started
        # By id: a later build under the same tag leaves this one untagged, not gone.
        self.images.append(run(["docker", "image", "inspect", "--format", "{{.Id}}", image]).stdout.strip())
        size = int(run(["docker", "image", "inspect", "--format", "{{.Size}}", image]).stdout)
        report(request, f"{build['dockerfile']} ({MODELS[arch]}): built in {seconds:.1f} s, "
                        f"image {image} is {size / 1e9:.2f} GB ({size / 2**30:.2f} GiB)")
        return image


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    compose_available()
    builder, builder_env = buildkit_command()
    base_image = os.environ.get("BASE_IMAGE") or (LOCAL_BASE_IMAGE if image_exists(LOCAL_BASE_IMAGE) else "")
    wheelhouse = os.environ.get("WHEELHOUSE")
    if wheelhouse is None:
        wheelhouse = "build/wheelhouse" if any((ROOT / "build/wheelhouse").glob("torch-*.whl")) else ""

    models = ROOT / MODELS_DIR
    shutil.rmtree(models, ignore_errors=True)
    cmd = [sys.executable, "scripts/make_tiny_models.py", str(models)]
    for arch in MODELS:
        cmd += ["--only", arch]
    run(cmd)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "MODEL_", "HF_"))}
    env.update(builder_env)
    env.update(WHEELHOUSE=wheelhouse, MODEL_REVISION="main", IMAGE_NAME=f"huggingface-gpt-test-{uuid.uuid4().hex[:8]}",
               BIND_ADDRESS="127.0.0.1", PORT=str(free_port()))
    if base_image:
        env["BASE_IMAGE"] = base_image
    else:
        env.pop("BASE_IMAGE", None)
    bundle = Bundle(env=env, image_name=env["IMAGE_NAME"], builder=builder, wheelhouse=wheelhouse,
                    logs=tmp_path_factory.mktemp("image-logs"))
    try:
        yield bundle
    finally:
        for image in bundle.images:
            run(["docker", "image", "rm", "--force", image], check=False)
        shutil.rmtree(models, ignore_errors=True)


@dataclass
class Stack:
    """The compose project started from the CPU profile."""

    bundle: Bundle
    project: str
    env: dict[str, str]
    image: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['PORT']}"

    def compose(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return run(["docker", "compose", "-p", self.project, "--profile", "cpu", *args],
                   env=self.env, check=check, timeout=timeout)

    def up(self, request, what: str) -> float:
        started = time.monotonic()
        proc = self.compose("up", "--detach", "--wait", "--wait-timeout", "600", "--no-build",
                            check=False, timeout=900)
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            logs = self.compose("logs", "--no-color", check=False).stdout[-6000:]
            pytest.fail(f"`docker compose up --wait` failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n"
                        f"container log:\n{logs}", pytrace=False)
        report(request, f"{what}: `docker compose --profile cpu up --wait` healthy after {seconds:.1f} s")
        return seconds


@pytest.fixture(scope="module")
def cpu_stack(bundle, request) -> Stack:
    image = bundle.build(request, "cpu", "gpt2")
    stack = Stack(bundle=bundle, project=f"hgpt-test-{uuid.uuid4().hex[:8]}",
                  env=bundle.with_model("gpt2"), image=image)
    try:
        stack.up(request, "CPU image, fresh volume")
        yield stack
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "30", check=False)


def check_generation(url: str, model_id: str) -> None:
    response = requests.post(f"{url}/generate", json=EXAMPLE, timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model_id
    assert isinstance(body["s_elapsed"], str) and re.fullmatch(r"\d+\.\d{2}", body["s_elapsed"]), body
    assert len(body["sentences"]) == 3
    for sentence in body["sentences"]:
        assert sentence["generated_text"].startswith(PROMPT), sentence


@pytest.mark.slow
def test_cpu_image_answers_the_original_example_request(cpu_stack):
    check_generation(cpu_stack.url, MODELS["gpt2"])


@pytest.mark.slow
def test_cpu_image_health_reports_the_cpu(cpu_stack):
    response = requests.get(f"{cpu_stack.url}/health", timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["device"] == "cpu"
    assert body["model"] == MODELS["gpt2"]


@pytest.mark.slow
def test_cpu_image_server_does_not_run_as_root(cpu_stack):
    uid = cpu_stack.compose("exec", "-T", "server-cpu", "id", "-u").stdout.strip()
    assert uid.isdigit() and uid != "0", uid
    status = cpu_stack.compose("exec", "-T", "server-cpu", "cat", "/proc/1/status").stdout
    [uids] = [line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")]
    assert "0" not in uids, f"the server process (pid 1) runs with uids {uids}"


@pytest.mark.slow
def test_cpu_image_is_offline_non_root_and_cpu_only(cpu_stack, request):
    config = json.loads(run(["docker", "image", "inspect", cpu_stack.image]).stdout)[0]["Config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["HF_HOME"] == "/models"
    assert config["User"] and config["User"].split(":")[0] not in ("", "0", "root")
    assert config["Healthcheck"]["Test"][:2] == ["CMD", "python3"]
    assert config["Cmd"] == ["python", "-m", "app"]
    torch = cpu_stack.compose("exec", "-T", "server-cpu", "python", "-c",
                              "import torch; print(torch.__version__, torch.version.cuda)").stdout.split()
    assert torch[1] == "None", f"the CPU image has a CUDA build of torch: {torch}"
    size = int(run(["docker", "image", "inspect", "--format", "{{.Size}}", cpu_stack.image]).stdout)
    report(request, f"CPU image: torch {torch[0]}, {size / 1e9:.2f} GB")
    assert size < 2.5e9, f"the CPU image is {size / 1e9:.1f} GB: the CPU-only torch should keep it well under"


@pytest.mark.slow
def test_rebuild_with_another_model_swaps_it_in_the_existing_volume(cpu_stack, request):
    """Docker fills the model-cache volume from the image only while it is empty: the entry point
    must put a newly baked model into the volume that still holds the previous one."""
    cpu_stack.image = cpu_stack.bundle.build(request, "cpu", "gpt-neo")
    cpu_stack.env = cpu_stack.bundle.with_model("gpt-neo", PORT=cpu_stack.env["PORT"])
    cpu_stack.up(request, "CPU image, another model, existing volume")
    health = requests.get(f"{cpu_stack.url}/health", timeout=30).json()
    assert health["model"] == MODELS["gpt-neo"]
    check_generation(cpu_stack.url, MODELS["gpt-neo"])
    cached = cpu_stack.compose("exec", "-T", "server-cpu", "ls", "/models/hub").stdout.split()
    assert {"models--test-org--tiny-gpt2", "models--test-org--tiny-gpt-neo"} <= set(cached), cached


@pytest.mark.slow
def test_cuda_image_builds_and_boots_on_the_cpu(bundle, request):
    if not bundle.wheelhouse and os.environ.get("IMAGE_TEST_CUDA") != "1":
        pytest.skip("without a wheelhouse this would download the CUDA wheels (~3 GB): set IMAGE_TEST_CUDA=1")
    image = bundle.build(request, "gpu", "gpt2")
    port = free_port()
    name = f"hgpt-test-cuda-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    run(["docker", "run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:{CONTAINER_PORT}",
         "--env", f"MODEL_ID={MODELS['gpt2']}", image])
    try:
        status = ""
        while time.monotonic() - started < 600 and status not in ("healthy", "exited", "dead"):
            time.sleep(1)
            status = run(["docker", "inspect", "--format",
                          "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}", name],
                         check=False).stdout.strip()
            if run(["docker", "inspect", "--format", "{{.State.Running}}", name], check=False).stdout.strip() != "true":
                status = "exited"
        logs = run(["docker", "logs", name], check=False)
        assert status == "healthy", f"status {status!r}; log:\n{(logs.stdout + logs.stderr)[-4000:]}"
        report(request, f"Dockerfile.cuda image (torch from {'the wheelhouse' if bundle.wheelhouse else 'the index'}):"
                        f" healthy on the CPU after {time.monotonic() - started:.1f} s")
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=30).json()
        assert health["model"] == MODELS["gpt2"]
        assert health["device"] == "cpu"
        check_generation(f"http://127.0.0.1:{port}", MODELS["gpt2"])
        uid = run(["docker", "exec", name, "id", "-u"]).stdout.strip()
        assert uid != "0"
    finally:
        run(["docker", "rm", "--force", "--volumes", name], check=False)
