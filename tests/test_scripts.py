"""The curl helper scripts and the examples, end to end against the real server.

They need `curl` and `jq` on the PATH, as they do for users; nothing is installed here.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port

PLAIN = ROOT / "scripts" / "curl_from_plain"
ENCODED = ROOT / "scripts" / "curl_from_encoded"
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module", autouse=True)
def tools():
    missing = [tool for tool in ("curl", "jq") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: the curl helper scripts need curl and jq "
                    f"(apt-get install {' '.join(missing)})", pytrace=False)


def run(script, *args, server=None, url: str | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("SERVER_URL", None)
    if server is not None or url is not None:
        env["SERVER_URL"] = url or server.url
    return subprocess.run([str(script), *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def prompt_of(example_script) -> str:
    """The prompt an example script sends, decoded the way the server decodes in_64."""
    body = json.loads(subprocess.run([str(example_script)], capture_output=True, text=True, check=True).stdout)
    compact = "".join(body["text"]["in_64"].split())
    return base64.b64decode(compact + "=" * (-len(compact) % 4)).decode("utf-8")


def test_curl_from_plain_pretty_prints_the_answer(gpt2_server, tiny_models):
    result = run(PLAIN, "examples/text.json", server=gpt2_server)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("{\n  \"model\"")  # jq's pretty printing, not one long line
    answer = json.loads(result.stdout)
    assert answer["model"] == tiny_models.repo_ids["gpt2"]
    prompt = json.loads((EXAMPLES / "text.json").read_text())["text"]["plain"]
    assert len(answer["sentences"]) == 3
    assert all(s["generated_text"].startswith(prompt) for s in answer["sentences"])


def test_curl_from_plain_reads_stdin_and_accepts_a_trailing_slash(gpt2_server, tmp_path):
    body = json.dumps({"text": {"plain": "Hello world"}, "max_length": 12})
    result = subprocess.run([str(PLAIN), "-"], input=body, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "SERVER_URL": gpt2_server.url + "/"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sentences"][0]["generated_text"].startswith("Hello world")


@pytest.mark.parametrize("example", ["b64-bash.sh", "b64-python.py"])
def test_curl_from_encoded_prints_the_first_text_raw(gpt2_server, example):
    prompt = prompt_of(EXAMPLES / example)
    assert "\n" in prompt  # code over several lines: what in_64 is for
    result = run(ENCODED, f"examples/{example}", server=gpt2_server)
    assert result.returncode == 0, result.stderr
    # Unescaped text (jq -r), not a JSON string: the code's line breaks are real ones.
    assert result.stdout.startswith(prompt)
    assert not result.stdout.startswith('"')


def test_curl_from_encoded_runs_a_script_in_the_current_folder(gpt2_server):
    result = run(ENCODED, "b64-python.py", server=gpt2_server, cwd=EXAMPLES)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(prompt_of(EXAMPLES / "b64-python.py"))


def test_curl_from_encoded_runs_a_script_that_is_not_executable(gpt2_server, tmp_path):
    script = tmp_path / "body.sh"
    script.write_text("""echo '{"text": {"in_64": "SGVsbG8gd29y\\nbGQhCg"}, "max_length": 12}'\n""")
    result = run(ENCODED, script, server=gpt2_server)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello world!\n")


@pytest.mark.parametrize("script", [PLAIN, ENCODED])
def test_a_missing_argument_prints_usage(script):
    result = run(script)
    assert result.returncode != 0
    assert result.stderr.startswith("usage: ") and script.name in result.stderr
    assert "SERVER_URL" in result.stderr


def test_curl_from_plain_fails_on_an_error_answer(gpt2_server, tmp_path):
    body = tmp_path / "bad.json"
    body.write_text(json.dumps({"text": {"plain": "Hello"}, "top_k": "many"}))
    result = run(PLAIN, body, server=gpt2_server)
    assert result.returncode != 0
    assert "HTTP 422" in result.stderr and "top_k" in result.stderr


def test_curl_from_encoded_fails_on_an_error_answer(gpt2_server, tmp_path):
    script = tmp_path / "bad-base64.sh"
    script.write_text("""#!/bin/sh\necho '{"text": {"in_64": "%%% not base64"}}'\n""")
    script.chmod(0o755)
    result = run(ENCODED, script, server=gpt2_server)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "HTTP 422" in result.stderr and "text.in_64" in result.stderr and "base64" in result.stderr


def test_curl_from_encoded_stops_when_the_script_fails(gpt2_server, tmp_path):
    script = tmp_path / "broken.sh"
    script.write_text("#!/bin/sh\necho 'no body today' >&2\nexit 3\n")
    script.chmod(0o755)
    result = run(ENCODED, script, server=gpt2_server)
    assert result.returncode != 0
    assert "no request sent" in result.stderr


@pytest.mark.parametrize("script, argument", [(PLAIN, "examples/text.json"), (ENCODED, "examples/b64-bash.sh")])
def test_no_server_is_an_error(script, argument):
    result = run(script, argument, url=f"http://127.0.0.1:{free_port()}")
    assert result.returncode != 0
    assert "no answer from" in result.stderr


def test_the_default_address_is_port_49151():
    # Nothing is started on the default port (it may be in use); the message says where it tried.
    result = run(PLAIN)
    assert "http://localhost:49151" in result.stderr


# ---- scripts/gpu_check.py ------------------------------------------------------------------------

GPU_CHECK = ROOT / "scripts" / "gpu_check.py"


def test_gpu_check_without_a_gpu_stops_at_once_and_says_why():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run its checks")
    result = subprocess.run([sys.executable, str(GPU_CHECK)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "no GPU" in result.stderr and "--device cpu --smoke" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_on_the_cpu():
    result = subprocess.run([sys.executable, str(GPU_CHECK), "--device", "cpu", "--smoke", "--skip-tests"],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| check")]
    checks = {(check, model): outcome for check, model, _dtype, outcome in rows}
    for concurrency in (1, 4):
        outcome = checks[(f"server c={concurrency}", "tiny gpt2")]
        assert re.match(rf"\d+ tok/s = \d+\.\d\dx generate@{concurrency}; TTFT \d+ ms; peak RSS \d+ MB$", outcome)
    for arch in ("gpt2", "gpt-neo", "gptj"):
        assert checks[("greedy = generate", f"tiny {arch}")] == "equal"
    eight_gib = [outcome for (check, _), outcome in checks.items() if check.startswith("8 GiB:")]
    assert len(eight_gib) == 2, checks
    for outcome in eight_gib:  # the float16 checkpoints load and answer (in float32, on the CPU)
        assert re.match(r"serves on cpu, in RAM; \d+\.\d tok/s$", outcome), outcome
