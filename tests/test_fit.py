"""The fit check at boot, memory settings, and the memory a load really takes.

Refusing to boot goes through the real `python -m app`, with a message that says what is needed, what
is there and what would fit. Starting with lower batch limits (logged, shown by /health, enforced on
requests), FIT_CHECK=false and falling back to bfloat16 under DTYPE=auto go through apps that
`create_app` built in process from those settings (the fit check and the load a worker of
`python -m app` runs). The planning arithmetic for GPUs is checked
with the planner's own inputs (the model's shape and a memory budget), which needs no GPU. The peak
resident memory of a load is measured in a fresh process on a GPT-2-medium-sized model.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import requests
import torch

from app.model.errors import ModelLoadError
from app.model.files import load_config
from app.model.fit import MemoryBudget, plan_for
from app.model.footprint import memory_need, model_shape
from app.settings import Settings
from tests.conftest import wait_for_exit

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench_models  # noqa: E402  (the benchmark's model configs and random checkpoints)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MiB = 1024**2


def settings(**values) -> Settings:
    return Settings(_env_file=None, **values)




def sizes_in(message: str) -> list[float]:
    """Every "12.3 GiB" / "45.6 MiB" of a message, in bytes, in order."""
    return [float(n) * (1024**3 if unit == "GiB" else MiB) for n, unit in re.findall(r"(\d+\.\d) (GiB|MiB)", message)]


def tiny_shape(tiny_models, arch: str = "gpt2"):
    return model_shape(load_config(settings(model_id=str(tiny_models.folders[arch]))))


# ---- at boot ----------------------------------------------------------------------------------------


def test_refuses_to_start_when_the_model_does_not_fit(start_server):
    server = start_server(MEMORY_LIMIT="32MiB", wait=False)
    assert wait_for_exit(server) != 0
    log = server.log
    line = next((line for line in log.splitlines() if "does not fit in memory" in line), None)
    assert line, log
    # How much is needed, how much there is, and what would make it fit.
    needed, weights, cache, work, there = sizes_in(line)[:5]
    assert needed > there == 32 * MiB
    assert "is allowed by MEMORY_LIMIT=32.0MiB" in line
    assert "DTYPE=bfloat16 (needs about" in line
    int8 = re.search(r"QUANTIZE=int8 \(needs about (\d+\.\d) (GiB|MiB), and runs faster\)", line)
    assert int8 and sizes_in(int8.group(0))[0] < needed  # the tiny GPT-2 in int8 needs less
    assert "a smaller model (MODEL_ID)" in line and "a higher MEMORY_LIMIT" in line
    assert "FIT_CHECK=false starts anyway" in line


def test_lowers_the_batch_limits_when_they_do_not_fit(inprocess_server, tiny_models):
    # Room for the model and a few thousand tokens of batch space, not for the configured 32768.
    server = inprocess_server(MEMORY_LIMIT="200MiB", MAX_BATCH_TOKENS=32768, MAX_BATCH_SIZE=32, DEVICE="auto")
    assert "lowered the batch limits to fit in memory: MAX_BATCH_TOKENS 32768 ->" in server.log
    health = server.client.get("/health").get_json()
    context = health["context_length"]
    assert context <= health["max_batch_tokens"] < 32768
    assert health["max_batch_size"] <= 32

    # A request within the lowered limit is served ...
    ok = server.client.post("/generate", json={"text": {"plain": "Hello"}, "max_length": 30})
    assert ok.status_code == 200, ok.get_data(as_text=True)
    # ... and one that only the configured limit would have allowed is refused, naming the limit in force.
    n = health["max_batch_tokens"] // context + 1
    assert n <= 8, "the lowered limit leaves too much room for this test's request"
    refused = server.client.post("/generate", json={
        "text": {"plain": "Hello"}, "max_length": context, "num_return_sequences": n, "do_sample": True, "seed": 1})
    assert refused.status_code == 422, refused.get_data(as_text=True)
    assert str(health["max_batch_tokens"]) in refused.get_json()["error"]["message"]
    assert "MAX_BATCH_TOKENS" in refused.get_json()["error"]["message"]


def test_fit_check_false_starts_anyway(inprocess_server):
    server = inprocess_server(MEMORY_LIMIT="32MiB", FIT_CHECK="false", DEVICE="auto")
    assert "starting anyway because FIT_CHECK=false" in server.log
    health = server.client.get("/health").get_json()
    assert health["status"] == "ok" and health["max_batch_tokens"] == 32768


def test_auto_falls_back_to_bfloat16_when_float32_does_not_fit(inprocess_server, tiny_models):
    shape = tiny_shape(tiny_models)
    floor = min(32768, shape.context_length)
    float32 = memory_need(shape, torch.float32, 32).total(floor)
    bfloat16 = memory_need(shape, torch.bfloat16, 32).total(floor)
    server = inprocess_server(MEMORY_LIMIT=str((float32 + bfloat16) // 2), DTYPE="auto", DEVICE="auto")
    health = server.client.get("/health").get_json()
    assert health["dtype"] == "bfloat16"
    assert "DTYPE=auto: " in server.log and "loading it as bfloat16" in server.log


def test_offload_is_refused_on_the_cpu(start_server):
    server = start_server(OFFLOAD="auto", DEVICE="cpu", wait=False)
    assert wait_for_exit(server) != 0
    assert "OFFLOAD=auto keeps on the CPU the weights that do not fit on the GPU" in server.log
    assert "set OFFLOAD=none" in server.log


def test_a_memory_limit_that_is_not_a_size_is_refused(start_server):
    server = start_server(MEMORY_LIMIT="lots", wait=False)
    assert wait_for_exit(server) == 2
    assert "MEMORY_LIMIT='lots' is invalid" in server.log


# ---- the planner's arithmetic --------------------------------------------------------------------

PUBLISHED_PARAMETERS = {  # as the hub's checkpoints hold them
    "gpt2": 124_439_808, "gpt-neo-125M": 125_198_592, "gpt-neo-1.3B": 1_315_575_808,
    "gpt-neo-2.7B": 2_651_307_520, "gpt-j-6B": 6_050_882_784,
}


@pytest.mark.parametrize("name", list(bench_models.MODELS))
def test_the_benchmark_configs_have_the_published_sizes(name):
    shape = model_shape(bench_models.make_config(name, 0))
    assert shape.parameters == PUBLISHED_PARAMETERS[name]


def test_gptj_in_bfloat16_plans_to_fit_16_gb_of_ram():
    shape = model_shape(bench_models.make_config("gpt-j-6B", 0))
    need = memory_need(shape, torch.bfloat16, 32)
    assert 11 * 1024**3 < need.weights < 11.5 * 1024**3
    assert need.total(shape.context_length) < 14 * 1024**3  # leaves room for the OS in 16 GB
    # float32 needs over 24 GB: DTYPE=auto falls back to bfloat16 on a 16 GB machine.
    plan = plan_for(settings(dtype="auto"), shape, torch.device("cpu"), torch.float32,
                    MemoryBudget(14 * 1024**3, "of RAM is available", False))
    assert plan.dtype == torch.bfloat16 and plan.max_batch_tokens >= shape.context_length


def test_gptj_with_int8_weights_plans_to_fit_12_gb_of_ram():
    """int8 keeps a byte per weight (a float16 checkpoint is quantized from its own weights, never widened
    to float32 whole), so QUANTIZE=auto serves GPT-J-6B in int8 where float32 does not fit."""
    shape = model_shape(bench_models.make_config("gpt-j-6B", 0))
    need = memory_need(shape, torch.float32, 32, quantize="int8")
    assert 5.5 * 1024**3 < need.weights < 6 * 1024**3
    for quantize in ("int8", "auto"):
        plan = plan_for(settings(dtype="auto", quantize=quantize), shape, torch.device("cpu"), torch.float32,
                        MemoryBudget(10 * 1024**3, "of RAM is available", False))
        assert (plan.dtype, plan.quantize) == (torch.float32, "int8")
        assert plan.max_batch_tokens >= shape.context_length and "with int8 weights" in plan.describe()


def gpt_j_on_a_gpu(memory: float, **values):
    config = bench_models.make_config("gpt-j-6B", 0)
    shape = model_shape(config)
    budget = MemoryBudget(int(memory * 1024**3), "of GPU memory is free on cuda:0", False)
    return shape, plan_for(settings(device="cuda", dtype="float16", **values), shape, torch.device("cuda", 0),
                           torch.float16, budget, config)


def test_gptj_on_an_8_gb_gpu_is_refused_without_offload():
    with pytest.raises(ModelLoadError) as refusal:
        gpt_j_on_a_gpu(7.5)
    message = str(refusal.value)
    assert "does not fit in memory: as float16 on cuda:0" in message
    assert "7.5 GiB of GPU memory is free on cuda:0" in message
    assert "OFFLOAD=auto" in message


def test_offload_keeps_on_the_cpu_what_does_not_fit_on_the_gpu():
    shape, plan = gpt_j_on_a_gpu(7.5, offload="auto")
    weights = memory_need(shape, torch.float16, 1).weights
    on_gpu = weights - plan.offloaded_bytes
    assert 0 < plan.offloaded_bytes < weights
    # The inputs go where the embeddings are: on the GPU.
    assert plan.device_map["transformer.wte"] == 0
    assert "cpu" in plan.device_map.values() and "disk" not in plan.device_map.values()
    # Weights, cache and working space together stay within the GPU's memory.
    assert on_gpu + plan.max_batch_tokens * memory_need(shape, torch.float16, 32).per_token < 7.5 * 1024**3
    assert plan.max_batch_tokens >= shape.context_length


def test_offload_refuses_when_not_even_the_cache_fits():
    with pytest.raises(ModelLoadError, match="does not fit in memory"):
        gpt_j_on_a_gpu(0.5, offload="auto")


def offloading_budget(tiny_models, arch: str) -> int:
    """A GPU memory limit under which tiny `arch` in float16 fits only with some layers in CPU RAM.

    With MAX_BATCH_TOKENS=1024 (one full-length sequence) the cache reserved on the GPU is the same with
    and without offloading, so a budget a little short of the weights exists.
    """
    folder = str(tiny_models.folders[arch])
    config = load_config(settings(model_id=folder))
    shape = model_shape(config)
    planned = settings(model_id=folder, device="cuda", dtype="float16", offload="auto", max_batch_tokens=1024)
    need = memory_need(shape, torch.float16, 32)
    low, high = need.fixed, need.total(1024) + need.weights
    while high - low > 1024:  # the smallest budget that starts, found by bisection
        middle = (low + high) // 2
        try:
            plan_for(planned, shape, torch.device("cuda", 0), torch.float16, MemoryBudget(middle, "test", False),
                     config)
            high = middle
        except ModelLoadError:
            low = middle
    plan = plan_for(planned, shape, torch.device("cuda", 0), torch.float16, MemoryBudget(high, "test", False), config)
    assert plan.offloaded_bytes > 0, "this budget fits the whole model"
    return high


@pytest.mark.parametrize("arch", ["gpt2", "gptj"])
def test_a_budget_that_needs_offloading_exists_for_the_tiny_models(tiny_models, arch):
    assert offloading_budget(tiny_models, arch) > 0


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("arch", ["gpt2", "gptj"])
def test_offload_serves_what_does_not_fit_on_the_gpu(start_server, tiny_models, arch):
    limit = offloading_budget(tiny_models, arch)
    body = {"text": {"plain": "When Konrad Adenauer was elected chancellor in"}, "max_length": 40}
    whole = start_server(MODEL_ID=tiny_models.repo_ids[arch], DEVICE="cuda", DTYPE="float16", MAX_BATCH_TOKENS=1024)
    expected = requests.post(whole.url + "/generate", json=body, timeout=120).json()["sentences"]
    whole.stop()

    server = start_server(MODEL_ID=tiny_models.repo_ids[arch], DEVICE="cuda", DTYPE="float16",
                          OFFLOAD="auto", MEMORY_LIMIT=str(limit), MAX_BATCH_TOKENS=1024)
    assert "of weights stay in CPU RAM (OFFLOAD=auto)" in server.log
    health = requests.get(server.url + "/health", timeout=30).json()
    assert health["device"].startswith("cuda") and health["dtype"] == "float16"
    answer = requests.post(server.url + "/generate", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["sentences"] == expected  # the same greedy text, only slower
    server.stop()


@pytest.mark.cuda
@needs_cuda
def test_memory_limit_caps_the_gpu(start_server):
    server = start_server(DEVICE="cuda", MEMORY_LIMIT="1GiB")
    assert "is allowed by MEMORY_LIMIT=1.0GiB" in server.log
    server.stop()


# ---- peak memory while loading -------------------------------------------------------------------

MEASURE = r"""
import gc, json, sys
import torch
from safetensors import safe_open
from app.model.loader import load_model
from app.settings import Settings

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

warm_up, folder, dtype = sys.argv[1:4]
# Imports and one small load first: the measurement is of the weights, not of the libraries.
# CPU_KERNELS=reference: the loader's own peak, without the float32 weights' packing for oneDNN.
load_model(Settings(_env_file=None, model_id=warm_up, device="cpu", dtype=dtype, cpu_kernels="reference"))
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
before = status("VmRSS")
loaded = load_model(Settings(_env_file=None, model_id=folder, device="cpu", dtype=dtype, cpu_kernels="reference"))
peak = status("VmHWM")
model = loaded.model
weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
# The chunked conversion wrote every value where it belongs (the embedding spans many chunks).
with safe_open(folder + "/model.safetensors", "pt") as stored:
    for name, param in [("transformer.wte.weight", model.transformer.wte.weight),
                        ("transformer.h.23.mlp.c_proj.weight", model.transformer.h[23].mlp.c_proj.weight)]:
        assert torch.equal(stored.get_tensor(name).to(param.dtype), param), name
print(json.dumps({"before": before, "peak": peak, "weights": weights, "dtype": str(loaded.dtype)}))
"""


@pytest.fixture(scope="module")
def gpt2_medium_float32(tmp_path_factory, tiny_models):
    """A GPT-2-medium-sized model (355M parameters) stored in float32, as the hub stores it (with the tiny
    GPT-2's tokenizer), and the tiny GPT-2 to warm up with."""
    from transformers import GPT2Config

    folder = tmp_path_factory.mktemp("gpt2-medium")
    tiny = tiny_models.folders["gpt2"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny / name).read_bytes())
    config = GPT2Config(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, bos_token_id=0, eos_token_id=0)
    bench_models.write_random_checkpoint(folder, config, "float32")
    yield folder, tiny
    shutil.rmtree(folder)  # 1.4 GB: not left for the rest of the run


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_peak_memory_while_loading_is_about_the_weights(gpt2_medium_float32, dtype, request):
    folder, warm_up = gpt2_medium_float32
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.run([sys.executable, "-c", MEASURE, str(warm_up), str(folder), dtype],
                             env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    figures = json.loads(process.stdout.strip().splitlines()[-1])
    growth = figures["peak"] - figures["before"]
    ratio = growth / figures["weights"]
    message = (f"float32 checkpoint loaded as {dtype}: peak RSS grew by {growth / MiB:.0f} MiB for "
               f"{figures['weights'] / MiB:.0f} MiB of weights ({ratio:.2f}x)")
    print(message)
    request.node.user_properties.append(("measurement", message))
    assert ratio <= 1.2, message
