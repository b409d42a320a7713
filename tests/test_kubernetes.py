"""deploy/kubernetes checked without a cluster: rendered, validated, scanned, and held against the server.

- `kubectl kustomize` renders every overlay (CPU, GPU, and each with the monitoring and autoscaling
  components, as deploy/kubernetes/example combines them);
- the built-in objects validate against the schemas of a current Kubernetes release
  (kubernetes-validate, strict: an unknown field fails); the custom resources (KEDA's ScaledObject,
  the Prometheus Operator's ServiceMonitor) are checked for what their operators need;
- the security scanner (checkov) finds nothing, and every check skipped in a manifest says why;
- the real server agrees with the manifests: each probe answers as Kubernetes expects (ready, busy
  with every connection taken, loading, draining), the autoscaler's metrics exist in /metrics with
  the labels its queries use and move with the load, every environment variable is a real setting
  with a valid value, the container port is the server's, the grace period outlasts GRACEFUL_TIMEOUT;
- with a Docker engine (marked `docker`), the CPU image serves and drains under the pod's security
  context, volumes, Secret file and memory limit.

The tools are installed by `bash scripts/k8s_tools.sh` (CI runs it); without them these tests are
skipped outside CI and fail in it.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import requests
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.settings import Settings, load_settings
from tests.conftest import free_port, inprocess_settings, wait_until

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
TOOLS = Path(os.environ.get("K8S_TOOLS", ROOT / "build" / "k8s-tools")) / "bin"

# Labels the Prometheus Operator gives every series scraped through a ServiceMonitor (the target's).
TARGET_LABELS = {"namespace", "service", "pod", "container", "endpoint", "job", "instance"}
# Renderings: overlay alone, or combined with the optional components (as the example does).
COMPONENTS = ("components/monitoring", "components/autoscaling")
RENDERINGS = {
    "cpu": ("overlays/cpu", ()),
    "gpu": ("overlays/gpu", ()),
    "example": ("example", ()),
    "gpu-autoscaled": ("overlays/gpu", COMPONENTS),
}
AUTOSCALED = ("example", "gpu-autoscaled")
CUSTOM_GROUPS = {"keda.sh", "monitoring.coreos.com"}
# Connections the busy server is given and the test takes (MAX_CONNECTIONS' least value).
SLOTS = 16


def tool(name: str) -> str:
    path = TOOLS / name
    if not path.exists():
        message = f"{path} is missing: run `bash scripts/k8s_tools.sh`"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return str(path)


def run(cmd: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs)


# ------------------------------------------------------------------------------------ renderings


class Rendering:
    def __init__(self, name: str, text: str, path: Path):
        self.name, self.text, self.path = name, text, path
        self.objects = [doc for doc in yaml.safe_load_all(text) if doc]

    def one(self, kind: str) -> dict:
        found = [obj for obj in self.objects if obj["kind"] == kind]
        assert len(found) == 1, f"{self.name}: {len(found)} objects of kind {kind}"
        return found[0]

    def kinds(self) -> list[str]:
        return sorted(obj["kind"] for obj in self.objects)

    @property
    def deployment(self) -> dict:
        return self.one("Deployment")

    @property
    def pod(self) -> dict:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict:
        (container,) = self.pod["containers"]
        return container

    @property
    def env(self) -> dict[str, str]:
        return {item["name"]: item["value"] for item in self.container.get("env", [])}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Rendering]:
    kubectl = tool("kubectl")
    out = tmp_path_factory.mktemp("rendered")
    renderings = {}
    for name, (folder, components) in RENDERINGS.items():
        target = KUBE / folder
        if components:  # an overlay of the user's own, as docs/kubernetes.md describes
            target = out / f"{name}-kustomization"
            target.mkdir()
            relative = lambda path: os.path.relpath(KUBE / path, target)  # kustomize wants relative paths
            (target / "kustomization.yaml").write_text(yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "resources": [relative(folder)], "components": [relative(c) for c in components],
            }))
        result = run([kubectl, "kustomize", str(target)])
        assert result.returncode == 0, f"kubectl kustomize {folder}:\n{result.stderr}"
        path = out / f"{name}.yaml"
        path.write_text(result.stdout)
        renderings[name] = Rendering(name, result.stdout, path)
    return renderings


def test_every_overlay_renders_the_server_and_what_serves_it(rendered):
    base = ["Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service", "ServiceAccount"]
    for name, rendering in rendered.items():
        expected = sorted(base + (["ScaledObject", "ServiceMonitor"] if name in AUTOSCALED else []))
        assert rendering.kinds() == expected, name
        namespaces = {obj["metadata"].get("namespace") for obj in rendering.objects}
        assert namespaces == {"huggingface-gpt"}, f"{name}: every object in one namespace, got {namespaces}"

        pod_labels = rendering.deployment["spec"]["template"]["metadata"]["labels"]
        selects_pods = lambda selector: selector and all(pod_labels.get(k) == v for k, v in selector.items())
        assert selects_pods(rendering.deployment["spec"]["selector"]["matchLabels"])
        assert selects_pods(rendering.one("Service")["spec"]["selector"])
        assert selects_pods(rendering.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
        assert selects_pods(rendering.one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"])
        assert rendering.pod["serviceAccountName"] == rendering.one("ServiceAccount")["metadata"]["name"]

        if name in AUTOSCALED:
            # The autoscaler owns the replica count: a `replicas` would reset it on every apply.
            assert "replicas" not in rendering.deployment["spec"]
            target = rendering.one("ScaledObject")["spec"]["scaleTargetRef"]
            assert target["name"] == rendering.deployment["metadata"]["name"]
            assert target.get("kind", "Deployment") == "Deployment"
        else:
            assert rendering.deployment["spec"]["replicas"] >= 2  # one may drain while the other serves


def test_the_images_are_the_ones_compose_builds(rendered):
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    tags = {profile: compose["services"][f"server-{profile}"]["image"].rsplit(":", 1)[1] for profile in ("cpu", "gpu")}
    assert rendered["cpu"].container["image"] == f"huggingface-gpt:{tags['cpu']}"
    assert rendered["gpu"].container["image"] == f"huggingface-gpt:{tags['gpu']}"
    assert rendered["example"].container["image"].startswith("registry.example.com/")


def test_the_gpu_overlay_asks_for_one_gpu_and_serves_on_it(rendered):
    gpu, cpu = rendered["gpu"], rendered["cpu"]
    assert gpu.container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in cpu.container["resources"]["limits"]
    assert gpu.env["DEVICE"] == "cuda" and cpu.env["DEVICE"] == "cpu"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu.pod["tolerations"])


# ------------------------------------------------------------------------- validator and scanner


def test_built_in_objects_validate_against_the_kubernetes_schemas(rendered):
    validate = tool("kubernetes-validate")
    result = run([validate, "--strict", *[str(r.path) for r in rendered.values()]])
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    for rendering in rendered.values():
        for obj in rendering.objects:
            if obj["apiVersion"].split("/")[0] in CUSTOM_GROUPS:
                continue  # no schema in a Kubernetes release: checked below
            line = f"{rendering.path} passed for resource {obj['kind'].lower()}/{obj['metadata']['name']}"
            assert line in output, f"{line!r} not in:\n{output}"


def test_the_validator_rejects_a_field_kubernetes_does_not_know(rendered, tmp_path):
    """The validation above can fail: a misspelt probe field is refused."""
    broken = rendered["cpu"].text.replace("failureThreshold: 120", "failureTreshold: 120")
    assert broken != rendered["cpu"].text
    (tmp_path / "broken.yaml").write_text(broken)
    result = run([tool("kubernetes-validate"), "--strict", str(tmp_path / "broken.yaml")])
    assert result.returncode != 0 and "failureTreshold" in result.stdout + result.stderr


def test_the_custom_resources_hold_what_their_operators_need(rendered):
    for name in AUTOSCALED:
        rendering = rendered[name]
        scaled = rendering.one("ScaledObject")
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaled["spec"]
        assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]  # never to zero: a cold start loads the model
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        # Scale-down waits longer than scale-up and gives back one replica at a time.
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] > behavior["scaleUp"]["stabilizationWindowSeconds"]
        assert all(p["type"] == "Pods" and p["value"] == 1 for p in behavior["scaleDown"]["policies"])
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
            # KEDA's CRD types trigger metadata as a map of strings: a bare number is refused on apply.
            assert all(isinstance(value, str) for value in trigger["metadata"].values()), trigger
            assert float(trigger["metadata"]["threshold"]) > 0
            assert trigger["metadata"]["serverAddress"].startswith("http")

        monitor = rendering.one("ServiceMonitor")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        service = rendering.one("Service")
        assert all(service["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
        # /metrics needs an API key when keys are set: the scraper's comes from the pods' Secret.
        secret = next(v["secret"]["secretName"] for v in rendering.pod["volumes"] if "secret" in v)
        assert endpoint["authorization"]["credentials"]["name"] == secret


def test_the_security_scanner_passes_and_every_skip_says_why(rendered):
    checkov = tool("checkov")
    result = run([checkov, "--framework", "kubernetes", "--skip-download", "--compact", "-o", "json",
                  *[arg for r in rendered.values() for arg in ("-f", str(r.path))]],
                 env={**os.environ, "LOG_LEVEL": "ERROR"})
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [(c["check_id"], c["resource"], c["file_path"]) for r in reports for c in r["results"]["failed_checks"]]
    assert result.returncode == 0 and not failed, failed or result.stderr[-3000:]
    assert sum(r["summary"]["passed"] for r in reports) > 0
    skipped = {c["check_id"] for r in reports for c in r["results"]["skipped_checks"]}
    annotations = {key: value for rendering in rendered.values() for obj in rendering.objects
                   for key, value in obj["metadata"].get("annotations", {}).items() if key.startswith("checkov.io/skip")}
    for value in annotations.values():
        check, _, reason = value.partition("=")
        assert len(reason.split()) >= 5, f"{check} is skipped without a reason"
    assert skipped == {value.partition("=")[0] for value in annotations.values()}


def test_the_scanner_catches_a_writable_root_filesystem(rendered, tmp_path):
    """The scan above can fail: the same Deployment with a writable root filesystem is reported."""
    broken = rendered["cpu"].text.replace("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false")
    assert broken != rendered["cpu"].text
    (tmp_path / "broken.yaml").write_text(broken)
    result = run([tool("checkov"), "--framework", "kubernetes", "--skip-download", "--compact", "-o", "json",
                  "-f", str(tmp_path / "broken.yaml")], env={**os.environ, "LOG_LEVEL": "ERROR"})
    report = json.loads(result.stdout)
    assert result.returncode != 0
    assert "CKV_K8S_22" in {c["check_id"] for c in report["results"]["failed_checks"]}


# ----------------------------------------------------------------------- manifests versus the image


def dockerfile(name: str) -> str:
    return (ROOT / name).read_text()


def image_env(name: str) -> dict[str, str]:
    """The ENV of a Dockerfile's last stage (the runtime image), names and literal values."""
    runtime = dockerfile(name).rsplit("\nFROM ", 1)[1]
    env = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", runtime, re.M):
        for key, value in re.findall(r"(\w+)=(\S+)", block.replace("\\\n", " ")):
            env[key] = value
    return env


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_the_security_context_matches_the_image(rendered, name):
    rendering = rendered[name]
    image_file = "Dockerfile.cpu" if name == "cpu" else "Dockerfile.cuda"
    text = dockerfile(image_file)
    uid = int(re.search(r"^ARG APP_UID=(\d+)$", text, re.M).group(1))
    assert re.search(r"^USER \$\{APP_UID\}:\$\{APP_UID\}$", text, re.M), f"{image_file} runs as APP_UID"
    pod, container = rendering.pod["securityContext"], rendering.container["securityContext"]
    assert pod["runAsNonRoot"] and pod["runAsUser"] == uid and pod["runAsGroup"] == uid
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    assert rendering.pod["automountServiceAccountToken"] is False
    # Where the server writes: gunicorn's heartbeat file and Python's temporary files go to /tmp.
    scratch = {v["name"] for v in rendering.pod["volumes"] if "emptyDir" in v}
    assert {"/tmp"} <= {m["mountPath"] for m in rendering.container["volumeMounts"] if m["name"] in scratch}
    # The model is in the image (HF_HOME), read-only is all it needs; nothing is mounted over it.
    assert image_env(image_file)["HF_HOME"] not in {m["mountPath"] for m in rendering.container["volumeMounts"]}


@pytest.mark.parametrize("name", ["cpu", "gpu", "example"])
def test_every_variable_is_a_real_setting_with_a_valid_value(rendered, name, tmp_path):
    rendering = rendered[name]
    settings_names = {field.upper() for field in Settings.model_fields}
    image_names = set(image_env("Dockerfile.cpu")) | set(image_env("Dockerfile.cuda"))
    env = rendering.env
    for variable in env:
        assert variable in settings_names or variable in image_names, \
            f"{variable} is neither a setting (app/settings.py) nor set by the images"
    assert "MODEL_ID" not in env, "the model is the image's (MODEL_ID baked in at build time)"
    assert env["HF_HUB_OFFLINE"] == "1"

    # The key file is the mounted Secret's item.
    mount = next(m for m in rendering.container["volumeMounts"] if env["API_KEY_FILE"].startswith(m["mountPath"] + "/"))
    volume = next(v for v in rendering.pod["volumes"] if v["name"] == mount["name"])
    item = env["API_KEY_FILE"].removeprefix(mount["mountPath"] + "/")
    assert item in {i["path"] for i in volume["secret"]["items"]} and mount["readOnly"]

    # Every value is one the server starts with (the key file stands in for the Secret).
    key_file = tmp_path / "api-keys"
    key_file.write_text("k8s-test-key\n")
    values = {k.lower(): v for k, v in env.items() if k in settings_names} | {"api_key_file": str(key_file)}
    if values.get("device", "").startswith("cuda") and not torch.cuda.is_available():
        values["device"] = "auto"  # only the GPU itself is missing here; the value is checked above
    settings = load_settings(_env_file=None, **values)

    (port,) = rendering.container["ports"]
    assert port["name"] == "http" and port["containerPort"] == settings.port == int(env["PORT"])
    assert settings.host == "0.0.0.0"  # reachable from the Service, not only from inside the pod
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        action = rendering.container[probe].get("httpGet") or rendering.container[probe]["tcpSocket"]
        assert action["port"] in ("http", settings.port)


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_the_grace_period_outlasts_graceful_timeout_and_the_pause(rendered, name):
    rendering = rendered[name]
    graceful = float(rendering.env.get("GRACEFUL_TIMEOUT", Settings.model_fields["graceful_timeout"].default))
    pause = rendering.container["lifecycle"]["preStop"]["sleep"]["seconds"]
    # The grace period runs from the start of the preStop pause; SIGTERM comes after it.
    assert rendering.pod["terminationGracePeriodSeconds"] > pause + graceful
    # The startup probe allows as long as the image's own health check does for loading a model.
    start_period = re.search(r"--start-period=(\d+)m", dockerfile("Dockerfile.cpu")).group(1)
    startup = rendering.container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= int(start_period) * 60


def test_cpu_resources_hold_the_default_model_at_the_configured_batch_limits(rendered):
    """The CPU overlay's memory is the fit check's estimate for the default model plus the runtime:
    the server starts there with the batch limits of the manifest, never lowered ones."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_models
    from app.model.fit import MemoryBudget, plan_for
    from app.model.footprint import model_shape
    from app.settings import DEFAULT_MODEL

    rendering = rendered["cpu"]
    env, resources = rendering.env, rendering.container["resources"]
    settings = load_settings(_env_file=None, **{k.lower(): v for k, v in env.items()
                                               if k.lower() in Settings.model_fields and k != "API_KEY_FILE"})
    name = next(n for n, model in bench_models.MODELS.items() if model["repo"] == DEFAULT_MODEL)
    shape = model_shape(bench_models.make_config(name, 0))
    limit = parse_quantity(resources["limits"]["memory"])
    runtime = 1024**3  # Python, torch and the server itself (peak RSS serving gpt-neo-125M: 0.9 GiB, weights included)
    plan = plan_for(settings, shape, torch.device("cpu"), torch.float32,
                    MemoryBudget(limit - runtime, "of RAM is available", False))
    assert not plan.lowered and plan.max_batch_tokens == settings.max_batch_tokens, plan.describe()
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    # One torch thread per CPU the pod may use: more would only be throttled.
    assert int(env["TORCH_THREADS"]) == int(resources["limits"]["cpu"])


def parse_quantity(text: str) -> int:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", text).groups()
    return int(number) * units.get(unit, 1)


# ------------------------------------------------------------------------ manifests versus the server


SELECTOR = re.compile(r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[^}]*)\}")
AGGREGATION = re.compile(r"\b(sum|avg|max|min)\(")


def selectors(query: str) -> list[tuple[str, dict[str, str]]]:
    return [(m["name"], dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))) for m in SELECTOR.finditer(query)]


def scrape(url: str, key: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """/metrics as Prometheus reads it: sample name -> [(labels, value)], and "__types__": the families' types."""
    response = requests.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert response.status_code == 200
    samples: dict[str, list] = {"__types__": {}}
    for family in text_string_to_metric_families(response.text):
        samples["__types__"][family.name] = family.type
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def evaluate(query: str, samples: dict) -> float:
    """A query over one scraped target: each selector is that target's value, and so is any
    aggregation of it; then plain arithmetic."""
    def value(match):
        (labels_and_value,) = samples[match["name"]]  # these gauges have no labels of their own
        return repr(labels_and_value[1])
    expression = AGGREGATION.sub("(", SELECTOR.sub(value, query))
    operators = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def arithmetic(node):
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in operators:
            left, right = arithmetic(node.left), arithmetic(node.right)
            return 0.0 if isinstance(node.op, ast.Div) and right == 0 else operators[type(node.op)](left, right)
        raise AssertionError(f"the test cannot evaluate {ast.dump(node)} of {query}")
    return arithmetic(ast.parse(expression, mode="eval").body)


def desired_replicas(scaled: dict, samples: dict) -> int:
    """What KEDA's HPA asks for, as a single replica's figures stand: per trigger ceil(value /
    threshold) (AverageValue), the largest of them, within the replica bounds."""
    wishes = [math.ceil(evaluate(t["metadata"]["query"], samples) / float(t["metadata"]["threshold"]))
              for t in scaled["spec"]["triggers"]]
    return min(scaled["spec"]["maxReplicaCount"], max(scaled["spec"]["minReplicaCount"], *wishes))


def manifest_settings(rendering: Rendering, key_file: Path, **overrides) -> dict[str, str]:
    """The CPU overlay's environment for a server started here: its own port, a local key file."""
    env = {k: v for k, v in rendering.env.items() if k not in ("HOST", "PORT")}
    return env | {"API_KEY_FILE": str(key_file)} | {k: str(v) for k, v in overrides.items()}


class Stream(threading.Thread):
    """One long streaming completion (1000 tokens, end-of-text ignored), read until it ends or `close()`."""

    def __init__(self, url: str, key: str, seed: int):
        super().__init__(daemon=True)
        self.url, self.key, self.seed = url, key, seed
        self.response: requests.Response | None = None
        self.status: int | None = None
        self.done = False  # the stream's last event came

    def run(self):
        try:
            self.response = requests.post(
                self.url + "/v1/completions", stream=True, timeout=300,
                headers={"Authorization": f"Bearer {self.key}"},
                json={"prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True,
                      "seed": self.seed, "temperature": 1.0})
            self.status = self.response.status_code
            for line in self.response.iter_lines(decode_unicode=True):
                self.done = self.done or line == "data: [DONE]"
        except (requests.RequestException, AttributeError, ValueError):  # closed from the test's side
            pass

    def close(self):
        if self.response is not None:
            self.response.close()


def tcp_probe(port: int, timeout: float) -> bool:
    """kubelet's tcpSocket probe: success when a TCP connection opens."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def http_probe(url: str, path: str, timeout: float) -> int | str:
    """kubelet's httpGet probe, with no credentials: the status (success is 200-399), or why none came."""
    try:
        return requests.get(url + path, timeout=timeout).status_code
    except requests.RequestException as exc:
        return type(exc).__name__


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "api-keys"
    path.write_text("# the Secret's api-keys item\nclient-key-0123\nmetrics-key-4567\n")
    return path


def established_connections(port: int) -> int:
    """Connections the server holds open on its port (its side of them)."""
    return sum(1 for c in psutil.net_connections(kind="tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED and c.raddr)


def busy_settings(rendered, key_file) -> dict[str, str]:
    # One sequence per batch, so that two streams fill the batch and the queue; the fewest connections
    # the server serves at once (MAX_CONNECTIONS; HTTP_THREADS where a connection takes a thread), so
    # that the test can take them all. Everything else is the CPU overlay's environment.
    return manifest_settings(rendered["cpu"], key_file, MAX_BATCH_SIZE=1, MAX_CONNECTIONS=SLOTS,
                             HTTP_THREADS=SLOTS, DEVICE="cpu", TORCH_THREADS=1)


def draining_settings(rendered, key_file) -> dict[str, str]:
    return manifest_settings(rendered["cpu"], key_file, MAX_BATCH_SIZE=1, DEVICE="cpu", TORCH_THREADS=1)


@pytest.fixture(scope="module")
def manifest_servers(rendered, key_file, boot_early):
    """Both servers on the CPU overlay's environment boot together, when the first of them is needed."""
    boot_early("test_probes_and_autoscaler_metrics_agree_with_a_busy_server", **busy_settings(rendered, key_file))
    boot_early("test_readiness_fails_while_draining_and_the_server_exits_within_the_grace_period",
               **draining_settings(rendered, key_file))


def test_probes_and_autoscaler_metrics_agree_with_a_busy_server(rendered, start_server, key_file, manifest_servers):
    cpu, example = rendered["cpu"], rendered["example"]
    container = cpu.container
    server = start_server(shared=True, **busy_settings(rendered, key_file))
    for probe in ("startupProbe", "readinessProbe"):
        status = http_probe(server.url, container[probe]["httpGet"]["path"], container[probe]["timeoutSeconds"])
        assert status == 200, f"{probe}: {status}"
    assert tcp_probe(server.port, container["livenessProbe"]["timeoutSeconds"])

    # Why the ServiceMonitor carries a key: /metrics needs one like every route but /health.
    assert requests.get(server.url + "/metrics", timeout=10).status_code == 401
    samples = scrape(server.url, "metrics-key-4567")
    scaled, service = example.one("ScaledObject"), example.one("Service")
    for trigger in scaled["spec"]["triggers"]:
        for metric, labels in selectors(trigger["metadata"]["query"]):
            assert metric in samples, f"{metric} (in the autoscaler's query) is not in /metrics"
            assert samples["__types__"][metric] == "gauge", metric
            own = {label for sample_labels, _ in samples[metric] for label in sample_labels}
            assert not own & TARGET_LABELS, f"{metric}'s own labels {own} would be renamed by Prometheus"
            assert set(labels) <= own | TARGET_LABELS, f"{metric}: the query selects on {set(labels) - own - TARGET_LABELS}"
            assert labels.get("namespace") == scaled["metadata"]["namespace"]
            assert labels.get("service") == service["metadata"]["name"]
    assert desired_replicas(scaled, samples) == scaled["spec"]["minReplicaCount"]  # idle: no scale-up

    streams = [Stream(server.url, "client-key-0123", seed) for seed in (1, 2)]
    for stream in streams:
        stream.start()
    try:
        # One sequence running (a full batch) and one request waiting: what the triggers measure.
        busy = {}
        assert wait_until(lambda: busy.update(scrape(server.url, "metrics-key-4567")) or (
            busy["gpt_server_batch_size"][0][1] == 1 and busy["gpt_server_queue_size"][0][1] == 1), 60)
        assert desired_replicas(scaled, busy) > 1, "a replica with a full batch and a queue asks for more"

        # Every connection the server serves at once is taken now; the kubelet's probe still connects.
        more = [Stream(server.url, "client-key-0123", seed) for seed in range(3, SLOTS + 1)]
        for stream in more:
            stream.start()
        streams += more
        assert wait_until(lambda: established_connections(server.port) >= SLOTS, 60)
        assert tcp_probe(server.port, container["livenessProbe"]["timeoutSeconds"]), \
            "the liveness probe fails on a busy server"
    finally:
        for stream in streams:
            stream.close()
        # The streams still waiting for their first byte cannot be closed from here: a graceful stop
        # would let every one of them generate its 1000 tokens. Nothing is left to check.
        server.kill()


def test_readiness_fails_while_the_model_loads(tiny_models):
    """In process, with the real app and engine: the engine's load waits until the test lets it go."""
    from app.engine import Engine
    from app.factory import create_app
    from app.model.loader import load_model

    settings = inprocess_settings(tiny_models)
    gate = threading.Event()
    engine = Engine(lambda: gate.wait(60) and load_model(settings), max_batch_size=settings.max_batch_size,
                    max_batch_tokens=settings.max_batch_tokens, max_queue=settings.max_queue,
                    queue_timeout=settings.queue_timeout).start()
    client = create_app(settings, engine=engine).test_client()
    try:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.get_json()["status"] == "loading"
        gate.set()
        assert wait_until(lambda: client.get("/health").status_code == 200, 120)
    finally:
        gate.set()
        engine.stop()
        engine.join(30)


def test_readiness_fails_while_draining_and_the_server_exits_within_the_grace_period(rendered, start_server,
                                                                                       key_file, manifest_servers):
    cpu = rendered["cpu"]
    readiness = cpu.container["readinessProbe"]
    server = start_server(shared=True, **draining_settings(rendered, key_file))
    kept_alive = requests.Session()  # a connection opened before SIGTERM, as a load balancer keeps one
    assert kept_alive.get(server.url + readiness["httpGet"]["path"], timeout=10).status_code == 200
    streams = [Stream(server.url, "client-key-0123", seed) for seed in (4, 5, 6)]
    for stream in streams:
        stream.start()
    try:
        assert wait_until(lambda: scrape(server.url, "metrics-key-4567")["gpt_server_queue_size"][0][1] == 2, 60)
        server.process.send_signal(signal.SIGTERM)  # what the kubelet sends after the preStop pause
        # While the running generations finish, /health says 503 on the open connection, and a new
        # probe connection gets 503 or is refused: either way the probe fails and the pod leaves the Service.
        # The master passes the signal on to the worker: poll until it has arrived there.
        answers = []
        assert wait_until(lambda: answers.append(kept_alive.get(server.url + readiness["httpGet"]["path"],
                                                                timeout=10)) or answers[-1].status_code != 200, 10)
        assert answers[-1].status_code == 503 and answers[-1].json()["status"] == "shutting_down"
        assert http_probe(server.url, readiness["httpGet"]["path"], readiness["timeoutSeconds"]) not in range(200, 400)
        # Every generation, running or waiting at SIGTERM, is answered in full.
        for stream in streams:
            stream.join(120)
        assert all(stream.status == 200 and stream.done for stream in streams), [(s.status, s.done) for s in streams]
    finally:
        for stream in streams:
            stream.close()
    graceful = float(cpu.env["GRACEFUL_TIMEOUT"])
    # Exits by itself, before the kubelet's SIGKILL at the end of the grace period would come.
    assert server.process.wait(graceful) == 0


# ------------------------------------------------------------------ the image under the pod's settings


def docker_engine_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def docker_run_flags(rendering: Rendering, secret_dir: Path, port: int) -> list[str]:
    """`docker run` options doing what the kubelet does with the CPU overlay's pod (but the CPU limit,
    which may exceed the machine's CPUs)."""
    pod, container = rendering.pod, rendering.container
    pod_security, security = pod["securityContext"], container["securityContext"]
    flags = ["--user", f"{security['runAsUser']}:{security['runAsGroup']}",
             "--group-add", str(pod_security["fsGroup"]),
             "--cap-drop", "ALL", "--stop-timeout", str(pod["terminationGracePeriodSeconds"]),
             "--memory", str(parse_quantity(container["resources"]["limits"]["memory"])),
             "-p", f"127.0.0.1:{port}:{container['ports'][0]['containerPort']}"]
    if security["readOnlyRootFilesystem"]:
        flags.append("--read-only")
    if security["allowPrivilegeEscalation"] is False:
        flags += ["--security-opt", "no-new-privileges"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            flags += ["--tmpfs", f"{mount['mountPath']}:rw,size={parse_quantity(volume['emptyDir']['sizeLimit'])}"]
        else:  # the Secret, as the kubelet writes it: owned by root and the fsGroup, with its defaultMode
            for item in volume["secret"]["items"]:
                path = secret_dir / item["path"]
                os.chown(path, 0, pod_security["fsGroup"])
                os.chmod(path, volume["secret"]["defaultMode"])
            flags += ["-v", f"{secret_dir}:{mount['mountPath']}:ro"]
    for name, value in rendering.env.items():
        flags += ["-e", f"{name}={value}"]
    return flags


@pytest.mark.docker
@pytest.mark.slow
def test_the_cpu_image_serves_and_drains_under_the_pods_security_context(rendered, tmp_path):
    """The CPU image, built offline with a tiny model, run as the pod runs it: its uid and groups,
    read-only root filesystem with only the pod's scratch volumes writable, no capabilities, the
    Secret's key file, the memory and CPU limits; it serves, and exits 0 within the grace period."""
    if not docker_engine_answers():
        pytest.skip("no Docker engine answers `docker info` (scripts/ci_docker_setup.sh starts one)")
    models = ROOT / "build" / "models" / "k8s-test"  # the build context admits build/models/
    image = f"huggingface-gpt-k8s-test:{os.getpid()}"
    container = f"huggingface-gpt-k8s-test-{os.getpid()}"
    build_args = {"MODEL_ID": "test-org/tiny-gpt2", "MODEL_SOURCE": "build/models/k8s-test/gpt2"}
    if run(["docker", "image", "inspect", "local/python-base:3.11"]).returncode == 0:
        build_args["BASE_IMAGE"] = "local/python-base:3.11"  # scripts/ci_docker_setup.sh makes it
    if any((ROOT / "build/wheelhouse/cpu").glob("torch-*.whl")):
        build_args["WHEELHOUSE"] = "build/wheelhouse/cpu"
    try:
        made = run([sys.executable, "scripts/make_tiny_models.py", str(models), "--only", "gpt2"])
        assert made.returncode == 0, made.stderr
        build = run(["docker", "buildx", "build", "--load", "-f", "Dockerfile.cpu", "-t", image,
                     *[arg for key, value in build_args.items() for arg in ("--build-arg", f"{key}={value}")], "."],
                    env={**os.environ, "DOCKER_BUILDKIT": "1"}, timeout=1800)
        assert build.returncode == 0, build.stderr[-4000:]

        secret_dir = tmp_path / "secret"
        secret_dir.mkdir()
        (secret_dir / "api-keys").write_text("client-key-0123\nmetrics-key-4567\n")
        port = free_port()
        started = run(["docker", "run", "-d", "--name", container, *docker_run_flags(rendered["cpu"], secret_dir, port),
                       image])
        assert started.returncode == 0, started.stderr
        url = f"http://127.0.0.1:{port}"
        logs = lambda: run(["docker", "logs", container]).stdout + run(["docker", "logs", container]).stderr
        running = lambda: run(["docker", "inspect", "--format", "{{.State.Running}}", container]).stdout.strip() == "true"
        assert wait_until(lambda: not running() or http_probe(url, "/health", 4) == 200, 300) and running(), logs()

        answer = requests.post(url + "/v1/completions", headers={"Authorization": "Bearer client-key-0123"},
                               json={"prompt": "Hello", "max_tokens": 8, "seed": 7}, timeout=120)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 8, answer.text
        assert requests.post(url + "/v1/completions", json={"prompt": "Hello"}, timeout=30).status_code == 401
        assert "gpt_server_queue_size" in scrape(url, "metrics-key-4567")

        grace = rendered["cpu"].pod["terminationGracePeriodSeconds"]
        stopped = run(["docker", "stop", "--time", str(grace), container])
        assert stopped.returncode == 0
        exit_code = run(["docker", "inspect", "--format", "{{.State.ExitCode}}", container]).stdout.strip()
        output = logs()
        assert exit_code == "0", output[-4000:]
        assert "Read-only file system" not in output and "Permission denied" not in output, output[-4000:]
    finally:
        run(["docker", "rm", "--force", container])
        run(["docker", "image", "rm", "--force", image])
        shutil.rmtree(models, ignore_errors=True)
