"""Precision: the dtype the server picks, the one it refuses, and half precision computing what float32 does.

Server behaviour is checked through the real `python -m app` where it refuses to start, and through
apps that `create_app` built in process from the settings (the engine loads the model as a worker of
`python -m app` does) where it serves. The numerics are checked on the model objects the loader returns (the production loading path: memory-mapped safetensors converted chunk by
chunk, the attention implementation the loader picks), against float32 logits of the same weights.
"""

from __future__ import annotations

import dataclasses

import pytest
import requests
import torch

from app.model.device import attention_implementation
from app.model.files import load_config
from app.model.fit import plan_fit
from app.model.loader import load_model
from app.model.safetensors_stream import load_weights
from app.settings import Settings
from tests.conftest import wait_for_exit

ARCHITECTURES = ("gpt2", "gpt-neo", "gptj")
PROMPT = "When Konrad Adenauer was elected chancellor in"

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def settings(model_id, **values) -> Settings:
    return Settings(_env_file=None, model_id=str(model_id), **values)




# ---- which dtype the server serves in ------------------------------------------------------------


def test_auto_is_float32_on_the_cpu(gpt2_server):
    health = requests.get(gpt2_server.url + "/health", timeout=30).json()
    assert health["device"] == "cpu"
    assert health["dtype"] == "float32"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bfloat16_serves_on_the_cpu(inprocess_server, tiny_models, arch):
    server = inprocess_server(MODEL_ID=tiny_models.folders[arch], DTYPE="bfloat16", DEVICE="auto")
    health = server.client.get("/health").get_json()
    assert (health["status"], health["device"], health["dtype"]) == ("ok", "cpu", "bfloat16")
    response = server.client.post("/generate", json={"text": {"plain": PROMPT}, "max_length": 40})
    assert response.status_code == 200, response.get_data(as_text=True)
    text = response.get_json()["sentences"][0]["generated_text"]
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_float16_on_the_cpu_is_refused_at_boot(start_server, device):
    if device == "auto" and torch.cuda.is_available():
        pytest.skip("DEVICE=auto is a GPU here")
    server = start_server(DTYPE="float16", DEVICE=device, wait=False)
    assert wait_for_exit(server) != 0
    assert "DTYPE=float16 is not supported on the CPU" in server.log
    assert "use DTYPE=bfloat16" in server.log


def test_the_attention_that_cannot_overflow_is_chosen_for_float16():
    assert attention_implementation("gptj", torch.float16) == "eager"  # float32 scores
    for model_type in ("gpt2", "gpt_neo", "gptj"):
        for dtype in (torch.float32, torch.bfloat16):
            assert attention_implementation(model_type, dtype) is None


# ---- half precision computes what float32 does -----------------------------------------------------


def logits_of(model) -> torch.Tensor:
    """Logits of a left-padded batch of two prompts, as the engine feeds it (mask and positions)."""
    input_ids = torch.tensor([[0, 0, 5, 17, 300, 42, 7, 99, 512, 3], [11, 2, 3, 40, 5, 6, 7, 800, 9, 10]])
    mask = torch.tensor([[0, 0] + [1] * 8, [1] * 10])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    device = model.device
    with torch.inference_mode():
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device))
    return out.logits.float().cpu()[mask.bool()]


def assert_close_to_float32(logits: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(logits).all(), "NaN or inf in the logits"
    # Each dtype rounds to its own precision (eps: 2^-7 for bfloat16, 2^-10 for float16) at every layer;
    # four times eps relative to the logits' scale is far above that and far below a wrong computation.
    tolerance = 4 * torch.finfo(dtype).eps * max(1.0, reference.abs().max().item())
    difference = (logits - reference).abs().max().item()
    assert difference <= tolerance, f"{dtype}: logits differ from float32 by {difference:.5f} (> {tolerance:.5f})"


@pytest.fixture(scope="module")
def float32_logits(tiny_models):
    return {arch: logits_of(load_model(settings(tiny_models.folders[arch], device="cpu", dtype="float32")).model)
            for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bfloat16_logits_match_float32_on_the_cpu(tiny_models, float32_logits, arch):
    loaded = load_model(settings(tiny_models.folders[arch], device="cpu", dtype="bfloat16"))
    assert loaded.dtype == torch.bfloat16 and next(loaded.model.parameters()).dtype == torch.bfloat16
    assert_close_to_float32(logits_of(loaded.model), float32_logits[arch], torch.bfloat16)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_float16_weights_and_attention_compute_what_float32_does(tiny_models, float32_logits, arch):
    """The server does not serve float16 on the CPU, but the loader's float16 path (conversion and the
    attention implementation it picks) is the one a GPU runs; the CPU computes it too."""
    folder = str(tiny_models.folders[arch])
    plan = plan_fit(settings(folder, device="cpu", dtype="float32"))
    plan = dataclasses.replace(plan, dtype=torch.float16,
                               attn_implementation=attention_implementation(plan_model_type(folder), torch.float16))
    model = load_weights(folder, load_config(settings(folder)), plan)
    assert next(model.parameters()).dtype == torch.float16
    if arch == "gptj":
        assert model.config._attn_implementation == "eager"
    assert_close_to_float32(logits_of(model), float32_logits[arch], torch.float16)


def plan_model_type(folder: str) -> str:
    return load_config(settings(folder)).model_type


@pytest.fixture(scope="module")
def loud_gptj(tiny_models, tmp_path_factory):
    """Tiny GPT-J whose queries and keys are scaled so that attention scores exceed float16's range
    (65504) while the queries and keys themselves stay within it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("loud-gptj")
    model = AutoModelForCausalLM.from_pretrained(tiny_models.folders["gptj"], dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(3000)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_models.folders["gptj"]).save_pretrained(folder)
    assert largest_attention_score(model) > torch.finfo(torch.float16).max
    return folder


def largest_attention_score(model) -> float:
    """The largest scaled query-key product of the first layer for `logits_of`'s prompts, in float32."""
    seen = {}
    attention = model.transformer.h[0].attn
    hooks = [getattr(attention, name).register_forward_hook(lambda m, i, out, name=name: seen.update({name: out}))
             for name in ("q_proj", "k_proj")]
    logits_of(model)
    for hook in hooks:
        hook.remove()
    heads, size = attention.num_attention_heads, attention.head_dim
    q, k = (seen[name].unflatten(-1, (heads, size)).transpose(1, 2) for name in ("q_proj", "k_proj"))
    return ((q @ k.transpose(-1, -2)) * attention.scaling).abs().max().item()


def test_float16_gptj_attention_stays_finite_when_scores_exceed_float16(loud_gptj):
    # Scores this large make attention pick single keys, so float16's rounding of queries and keys may
    # pick others than float32 does: the symptom of overflow to look for is NaN or inf.
    plan = plan_fit(settings(loud_gptj, device="cpu", dtype="float32"))
    plan = dataclasses.replace(plan, dtype=torch.float16,
                               attn_implementation=attention_implementation("gptj", torch.float16))
    logits = logits_of(load_weights(str(loud_gptj), load_config(settings(loud_gptj)), plan))
    assert torch.isfinite(logits).all()


# ---- on a GPU ----------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_half_precision_logits_match_float32_on_the_gpu(tiny_models, arch, dtype):
    if dtype == "bfloat16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("this GPU emulates bfloat16")
    folder = tiny_models.folders[arch]
    reference = logits_of(load_model(settings(folder, device="cuda", dtype="float32")).model)
    loaded = load_model(settings(folder, device="cuda", dtype=dtype))
    assert loaded.device.type == "cuda" and next(loaded.model.parameters()).device.type == "cuda"
    if arch == "gptj" and dtype == "float16":
        assert loaded.attn_implementation == "eager"
    assert_close_to_float32(logits_of(loaded.model), reference, getattr(torch, dtype))


@pytest.mark.cuda
@needs_cuda
def test_float16_gptj_stays_finite_on_the_gpu(loud_gptj):
    loaded = load_model(settings(loud_gptj, device="cuda", dtype="float16"))
    assert loaded.attn_implementation == "eager"
    assert torch.isfinite(logits_of(loaded.model)).all()


@pytest.mark.cuda
@needs_cuda
def test_auto_on_the_gpu_is_half_precision(start_server):
    server = start_server(DEVICE="cuda")
    health = requests.get(server.url + "/health", timeout=30).json()
    expected = "bfloat16" if torch.cuda.get_device_capability() >= (8, 0) else "float16"
    assert (health["device"].split(":")[0], health["dtype"]) == ("cuda", expected)
    server.stop()
