"""Settings at boot: bad values, the original project's `.env` keys, a `.env` file in the working
directory, and a model that is not on this machine.

Refusals go through the real `python -m app` (its output and exit status). Settings that start a
server are read in process by `load_settings()`, as `python -m app` reads them (the environment, a
`.env` in the working directory), and served by the app and engine `create_app` builds from them."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import requests
import torch

from app.settings import load_settings
from tests.conftest import free_port, server_env

BOOT_TIMEOUT = 120
ROOT = pathlib.Path(__file__).resolve().parent.parent


def boot(tiny_models, tmp_path, unset=(), dotenv: str | None = None, **settings) -> subprocess.CompletedProcess:
    """Run `python -m app` to its end (it must refuse to start) in `tmp_path`, with an optional `.env`."""
    env = server_env(tiny_models, **settings)
    for key in unset:
        env.pop(key, None)
    if dotenv is not None:
        (tmp_path / ".env").write_text(dotenv)
    try:
        return subprocess.run([sys.executable, "-m", "app"], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=BOOT_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the server started instead of refusing the settings:\n{exc.stderr}")


def refusal(result: subprocess.CompletedProcess) -> list[str]:
    """The error lines of a server that refused to start; it must not have started listening."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "Listening at" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:") or line.startswith("setting ")]
    assert lines, result.stderr
    return lines


@pytest.fixture
def start(tiny_models, tmp_path, monkeypatch, inprocess_server):
    """`start(unset=[...], dotenv="...", **settings)`: what `python -m app` serves when started in
    `tmp_path` (with an optional `.env`) with this environment (tiny GPT-2 from its folder unless told
    otherwise), in process: the settings as `load_settings()` reads them there, then the app."""

    def boot_in_process(unset=(), dotenv: str | None = None, **settings):
        for key in list(os.environ):
            if key.startswith(("SRVREST_", "MODEL_", "API_KEY")):  # as server_env leaves them out
                monkeypatch.delenv(key)
        env = {"MODEL_ID": str(tiny_models.folders["gpt2"]), "HOST": "127.0.0.1", "PORT": str(free_port()),
               "TORCH_THREADS": "1", **{key.upper(): str(value) for key, value in settings.items()}}
        for key, value in env.items():
            if key not in unset:
                monkeypatch.setenv(key, value)
        if dotenv is not None:
            (tmp_path / ".env").write_text(dotenv)
        monkeypatch.chdir(tmp_path)
        return inprocess_server(settings=load_settings())

    return boot_in_process


# ---- Bad values ------------------------------------------------------------------------------------


# Bad values of every kind, grouped so that each boot checks several settings at once: the server
# reports every bad value, each on its own line naming the setting, the value and what is allowed.
BAD_VALUES = [
    {
        "PORT": ("http", "integer"),
        "DEVICE": ("gpu", "auto, cpu, cuda or cuda:N"),
        "DTYPE": ("half", "'auto', 'float32', 'float16' or 'bfloat16'"),
        "MODEL_ID": ("   ", "must not be empty"),
        "MAX_BODY_BYTES": ("10", "greater than or equal to 1024"),
        "MAX_NEW_TOKENS": ("0", "greater than or equal to 1"),
        "MAX_NUM_RETURN_SEQUENCES": ("-3", "greater than or equal to 1"),
        "GRACEFUL_TIMEOUT": ("soon", "number"),
        "QUEUE_TIMEOUT": ("0", "greater than 0"),
        "HTTP_THREADS": ("1", "greater than or equal to 2"),
        "SRVREST_MODEL": ("5", "less than or equal to 4"),
        "SRVREST_CUDA_DEV": ("-2", "greater than or equal to -1"),
    },
    {
        "PORT": ("70000", "less than or equal to 65535"),
        "DEVICE": ("cuda:first", "auto, cpu, cuda or cuda:N"),
        "MAX_BODY_BYTES": ("2MB", "integer"),
        "MAX_NUM_RETURN_SEQUENCES": ("100", "less than or equal to 64"),
        "SRVREST_MODEL": ("gpt2", "integer"),
    },
]


@pytest.mark.parametrize("bad", BAD_VALUES, ids=lambda bad: ",".join(bad))
def test_bad_values_stop_the_server_with_one_clear_line_each(tiny_models, tmp_path, bad):
    lines = refusal(boot(tiny_models, tmp_path, **{name: value for name, (value, _) in bad.items()}))
    assert len(lines) == len(bad), lines
    for name, (value, allowed) in bad.items():
        line = next((line for line in lines if f"{name}=" in line), None)
        assert line is not None, (name, lines)
        assert repr(value) in line and allowed in line, (name, line)


def test_one_bad_value_is_one_line(tiny_models, tmp_path):
    lines = refusal(boot(tiny_models, tmp_path, PORT="0"))
    assert lines == ["error: setting PORT='0' is invalid: Input should be greater than or equal to 1"]


def test_a_bad_value_in_dotenv_is_reported_the_same_way(tiny_models, tmp_path):
    lines = refusal(boot(tiny_models, tmp_path, dotenv="# settings\nDTYPE=double\n"))
    assert len(lines) == 1 and "DTYPE" in lines[0] and "'double'" in lines[0], lines


# ---- .env in the working directory -------------------------------------------------------------------


def test_dotenv_supplies_defaults_and_the_environment_wins(tiny_models, start):
    gptj = str(tiny_models.folders["gptj"])
    dotenv = "\n".join([
        "# an operator's .env",
        f"MODEL_ID={gptj}",
        "MAX_NUM_RETURN_SEQUENCES=2",
        "MAX_STOP_SEQUENCES=1",
        "PORT=99999",  # would not even be a valid port: the environment's PORT wins over it
        "",
    ])
    server = start(unset=["MODEL_ID"], dotenv=dotenv, MAX_STOP_SEQUENCES="3")
    try:
        assert requests.get(server.url + "/health", timeout=30).json()["model"] == gptj
        body = {"text": {"plain": "Hello"}, "max_length": 10, "do_sample": True, "seed": 1}
        answer = requests.post(server.url + "/generate", json=body, timeout=60).json()
        assert answer["model"] == gptj
        too_many = requests.post(server.url + "/generate", json={**body, "num_return_sequences": 3}, timeout=60)
        assert too_many.status_code == 422 and "at most 2" in too_many.json()["error"]["message"]
        three_stops = requests.post(server.url + "/generate", json={**body, "stop": ["x", "y", "z"]}, timeout=60)
        assert three_stops.status_code == 200, three_stops.text
        four_stops = requests.post(server.url + "/generate", json={**body, "stop": ["w", "x", "y", "z"]}, timeout=60)
        assert four_stops.status_code == 422 and "at most 3" in four_stops.json()["error"]["message"]
    finally:
        server.stop()


# ---- The original project's keys ------------------------------------------------------------------------

LEGACY_MODELS = ["gpt2", "EleutherAI/gpt-neo-125M", "EleutherAI/gpt-neo-1.3B", "EleutherAI/gpt-neo-2.7B",
                 "EleutherAI/gpt-j-6B"]


@pytest.mark.parametrize("index", [0, 2, 3, 4])  # 1 is in the old .env below
def test_srvrest_model_chooses_the_model_when_model_id_is_unset(tiny_models, tmp_path, index):
    # These models cannot be on this machine: the refusal names the one SRVREST_MODEL chose.
    lines = refusal(boot(tiny_models, tmp_path, unset=["MODEL_ID"], SRVREST_MODEL=str(index)))
    assert f"model '{LEGACY_MODELS[index]}' was not found" in lines[0], lines


def test_an_old_dotenv_with_srvrest_keys_still_works(tiny_models, tmp_path):
    old_dotenv = "SRVREST_CUDA_DEV=-1   \nSRVREST_MODEL=1\n"
    lines = refusal(boot(tiny_models, tmp_path, unset=["MODEL_ID"], dotenv=old_dotenv))
    assert "'EleutherAI/gpt-neo-125M'" in lines[0], lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_srvrest_cuda_dev_asks_for_cuda(tiny_models, tmp_path):
    lines = refusal(boot(tiny_models, tmp_path, SRVREST_CUDA_DEV="0"))
    assert len(lines) == 1, lines
    assert "SRVREST_CUDA_DEV=0" in lines[0] and "cuda:0" in lines[0] and "no CUDA device" in lines[0], lines
    assert "DEVICE=cpu" in lines[0], lines  # what to do instead


def test_srvrest_cuda_dev_minus_one_serves_on_the_cpu(tiny_models, start):
    server = start(unset=["DEVICE"], SRVREST_CUDA_DEV="-1")
    try:
        health = requests.get(server.url + "/health", timeout=30).json()
        assert health["device"] == "cpu" and health["model"] == str(tiny_models.folders["gpt2"])
        answer = requests.post(server.url + "/generate", json={"text": {"plain": "Hello"}, "max_length": 8}, timeout=60)
        assert answer.status_code == 200, answer.text
    finally:
        server.stop()


def test_model_id_and_device_win_over_the_srvrest_keys(tiny_models, start):
    server = start(DEVICE="cpu", SRVREST_MODEL="4", SRVREST_CUDA_DEV="0")
    try:
        health = requests.get(server.url + "/health", timeout=30).json()
        assert health["model"] == str(tiny_models.folders["gpt2"]) and health["device"] == "cpu"
    finally:
        server.stop()


# ---- A model that is not there --------------------------------------------------------------------------


def test_a_missing_model_names_the_model_the_cache_and_how_to_prefetch(tiny_models, tmp_path):
    lines = refusal(boot(tiny_models, tmp_path, MODEL_ID="test-org/not-prefetched"))
    assert len(lines) == 1, lines
    line = lines[0]
    assert "'test-org/not-prefetched'" in line, line
    assert str(tiny_models.hf_home / "hub") in line, line
    assert "python scripts/prefetch_model.py test-org/not-prefetched" in line, line
    assert "connect" not in line, line  # the server never goes to the hub; saying so would mislead


def test_a_missing_revision_names_it(tiny_models, tmp_path):
    lines = refusal(boot(tiny_models, tmp_path, MODEL_REVISION="v2.0"))
    assert "'v2.0'" in lines[0] and tiny_models.repo_ids["gpt2"] in lines[0], lines
    assert f"prefetch_model.py --revision v2.0 {tiny_models.repo_ids['gpt2']}" in lines[0], lines


def test_a_missing_or_empty_folder_is_named(tiny_models, tmp_path):
    missing = tmp_path / "no-such-model"
    lines = refusal(boot(tiny_models, tmp_path, MODEL_ID=str(missing)))
    assert str(missing) in lines[0] and "no such folder" in lines[0], lines
    empty = tmp_path / "empty-model"
    empty.mkdir()
    lines = refusal(boot(tiny_models, tmp_path, MODEL_ID=str(empty)))
    assert str(empty) in lines[0] and "save_pretrained" in lines[0], lines


# ---- The settings reference --------------------------------------------------------------------------


def test_every_setting_has_a_description():
    from app.settings import Settings

    undocumented = [name.upper() for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert not undocumented, (
        f"settings without a description: {', '.join(undocumented)}; give each one "
        "Field(..., description=...) in app/settings.py, then run `python scripts/settings_doc.py`"
    )


def test_the_settings_reference_is_up_to_date():
    result = subprocess.run([sys.executable, "scripts/settings_doc.py", "--check"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, (
        f"{result.stderr.strip()}\ndocs/settings.md no longer matches app/settings.py; regenerate it with "
        "`python scripts/settings_doc.py` and commit it"
    )
    # The reference names every setting the server reads, with its default.
    from app.settings import Settings

    text = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    for name, field in Settings.model_fields.items():
        assert f"| `{name.upper()}` |" in text, name


@pytest.mark.parametrize("module, kept_out", [
    # `python -m app` reads the settings and runs the pre-fork checks: torch and transformers there would
    # take seconds, and a few hundred MB until it becomes the master.
    ("app.__main__", {"torch", "transformers"}),
    # The gunicorn master serves no request: what it imports stays resident for the server's whole life.
    ("app.master", {"torch", "transformers", "pydantic", "pydantic_settings", "flask"}),
])
def test_the_server_process_imports_nothing_heavy_before_it_forks(module, kept_out):
    code = f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(kept_out)!r})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
