"""QUANTIZE=int8: int8 linear layers on the CPU, for GPT-2, GPT-Neo and GPT-J.

The numerics are checked on the model objects the loader returns (the production loading path), against
float32 logits of the same weights. What a user does with the option goes over HTTP to an app that
`create_app` built in process with QUANTIZE=int8 (its engine loads and quantizes the model as a worker of
`python -m app` does): health, greedy and sampled text, streaming, seeds, log-probabilities. The real
server serves what needs it: cancellation when a client goes away (gunicorn's socket tells), and the
refusals at boot where int8 does not apply. How good int8 is on a trained model is measured by
scripts/quality_int8.py (random tiny models cannot tell), how fast by scripts/bench.py.
"""

from __future__ import annotations

import json
import shutil

import openai
import pytest
import requests
import torch
from transformers.pytorch_utils import Conv1D

from app.model.checkpoint_embedding import CheckpointEmbedding
from app.model.errors import QuantizationError
from app.model.int8 import Int8Linear, is_int8_linear, quantize
from app.model.loader import load_model
from app.model.packed import PackedLinear
from app.settings import Settings
from tests.conftest import ARCHITECTURES, batch_size, wait_for_exit, wait_until

PROMPT = "Beautiful is better than ugly. Explicit is better than implicit."


def settings(model_id, **values) -> Settings:
    """float32 is transformers' own layers here (CPU_KERNELS=reference): the reference int8 is held to."""
    return Settings(_env_file=None, model_id=str(model_id), **{"cpu_kernels": "reference", **values})


# ---- int8 computes what float32 does ---------------------------------------------------------------


def logits_of(model) -> torch.Tensor:
    """Logits of a left-padded batch of prompts, as the engine feeds it (mask and positions)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (4, 48), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[0, :7] = 0
    mask[2, :20] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions)
    return out.logits[mask.bool()]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_int8_logits_are_close_to_float32(arch, tiny_models):
    reference = load_model(settings(tiny_models.folders[arch], device="cpu"))
    loaded = load_model(settings(tiny_models.folders[arch], device="cpu", quantize="int8"))
    model = loaded.model
    # Every linear layer (GPT-2's Conv1D included) and the output layer hold int8 weights now, and the
    # token embedding reads its rows from the checkpoint (tests/test_checkpoint_embedding.py); no float32
    # matrix is left but the position embeddings and layer norms.
    assert not [m for m in model.modules() if type(m) in (torch.nn.Linear, Conv1D, torch.nn.Embedding)
                and m is not getattr(model.transformer, "wpe", None)]
    assert is_int8_linear(model.get_output_embeddings())
    assert isinstance(model.get_input_embeddings(), CheckpointEmbedding)
    assert model.device.type == "cpu" and loaded.dtype == torch.float32

    assert_close_to_float32(logits_of(reference.model), logits_of(model))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_maintained_kernel_computes_what_float32_does(arch, tiny_models):
    """`torch._int_mm` layers, which serve int8 when torch no longer ships FBGEMM's dynamic quantization."""
    reference = load_model(settings(tiny_models.folders[arch], device="cpu"))
    model = load_model(settings(tiny_models.folders[arch], device="cpu")).model
    quantize(model, "int8", kernel="int_mm")
    assert isinstance(model.get_output_embeddings(), Int8Linear)
    assert not [m for m in model.modules() if type(m) in (torch.nn.Linear, Conv1D, torch.nn.Embedding)
                and m is not getattr(model.transformer, "wpe", None)]
    assert_close_to_float32(logits_of(reference.model), logits_of(model))


def assert_close_to_float32(expected: torch.Tensor, got: torch.Tensor) -> None:
    assert torch.isfinite(got).all()
    assert not torch.equal(got, expected), "nothing was quantized"
    # 8 bits keep about 2.5 significant digits per weight and activation: every logit stays within a
    # quarter of the logits' spread of float32's (measured: at most 0.2 of it), and the logit vectors keep
    # their direction (a wrong scale, transposition or layer would give errors of the spread's size).
    assert (got - expected).abs().max() < 0.25 * expected.std()
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    assert cosine.min() > 0.995, cosine.min()
    # The most likely next token is float32's wherever float32 is not close to a tie (random tiny models
    # have nearly flat distributions, where the rounding may swap the two best tokens).
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.2 * expected.std()
    assert clear.sum() > len(expected) // 3
    assert torch.equal(got[clear].argmax(-1), expected[clear].argmax(-1))
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean()
    assert agreement > 0.85, agreement


def test_none_leaves_the_model_alone(tiny_models):
    loaded = load_model(settings(tiny_models.folders["gpt2"], device="cpu"))
    assert quantize(loaded.model, "none") is loaded.model
    assert any(isinstance(m, Conv1D) for m in loaded.model.modules())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_float16_checkpoint_is_quantized_from_its_own_weights(arch, tiny_models, tmp_path):
    """int8 loads a float16 checkpoint as stored (no float32 copy of it) and makes its int8 rows from
    those weights: the same model as int8 made from the same weights stored in float32, which computes
    in float32 too."""
    from transformers import AutoModelForCausalLM

    half, full = tmp_path / "float16", tmp_path / "float32"
    model = AutoModelForCausalLM.from_pretrained(tiny_models.folders[arch], dtype=torch.float16)
    model.save_pretrained(half)
    model.to(torch.float32).save_pretrained(full)  # exactly the float16 values, widened
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_models.folders[arch] / name).exists():
            for folder in (half, full):
                shutil.copy(tiny_models.folders[arch] / name, folder / name)
    from_half = load_model(settings(half, device="cpu", quantize="int8"))
    from_full = load_model(settings(full, device="cpu", quantize="int8"))
    assert from_half.dtype == torch.float32
    assert {t.dtype for t in [*from_half.model.parameters(), *from_half.model.buffers()] if t.is_floating_point()} \
        == {torch.float32}
    torch.testing.assert_close(logits_of(from_half.model), logits_of(from_full.model), rtol=0, atol=0)


def test_a_model_of_mixed_dtypes_is_refused(tiny_models):
    loaded = load_model(settings(tiny_models.folders["gpt2"], device="cpu"))
    loaded.model.lm_head.to(torch.float16)
    with pytest.raises(QuantizationError, match="DTYPE=float32"):
        quantize(loaded.model, "int8")


# ---- serving ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ARCHITECTURES)
def int8_server(request, inprocess_server, tiny_models):
    """The app with QUANTIZE=int8 over HTTP (`url`), with the lines it logged while it loaded (`log`)."""
    server = inprocess_server(MODEL_ID=tiny_models.folders[request.param], QUANTIZE="int8", DEVICE="auto")
    server.arch = request.param
    return server


@pytest.fixture(scope="module")
def int8_models(tiny_models):
    """The int8 model of each architecture as the server loads it, to compare the server's output with."""
    return {arch: load_model(settings(tiny_models.folders[arch], device="cpu", quantize="int8"))
            for arch in ARCHITECTURES}


def generate(url: str, prompt: str, **fields) -> dict:
    response = requests.post(url + "/generate", json={"text": {"plain": prompt}, **fields}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def continuation(result: dict, prompt: str, index: int = 0) -> str:
    text = result["sentences"][index]["generated_text"]
    assert text.startswith(prompt)
    return text[len(prompt):]


def test_health_reports_int8(int8_server):
    health = requests.get(int8_server.url + "/health", timeout=30).json()
    assert (health["status"], health["device"], health["dtype"], health["quantization"]) == (
        "ok", "cpu", "float32", "int8")
    assert "QUANTIZE=int8" in int8_server.log


def test_default_is_no_quantization(gpt2_server):
    assert requests.get(gpt2_server.url + "/health", timeout=30).json()["quantization"] == "none"


@pytest.mark.parametrize("dtype, expected", [("auto", "int8"), ("bfloat16", "none")])
def test_auto_serves_int8_where_it_applies(inprocess_server, dtype, expected):
    """QUANTIZE=auto (what the CPU image serves): int8 for float32 weights on the CPU, none for bfloat16."""
    server = inprocess_server(fresh=True, QUANTIZE="auto", DTYPE=dtype)
    try:
        health = server.client.get("/health").get_json()
        assert (health["quantization"], health["dtype"]) == (expected, "float32" if dtype == "auto" else dtype)
        model = server.engine.loaded.model
        assert is_int8_linear(model.get_output_embeddings()) == (expected == "int8")
        answer = server.client.post("/generate", json={"text": {"plain": PROMPT}, "max_new_tokens": 8})
        assert answer.status_code == 200, answer.get_data(as_text=True)
    finally:
        server.stop()


def test_float32_on_the_cpu_packs_its_layers_unless_reference_is_asked(inprocess_server):
    """QUANTIZE=none on the CPU: the linear layers packed for oneDNN (CPU_KERNELS=packed, the default), or
    transformers' own (reference); the greedy text is the same."""
    texts = {}
    for kernels in ("packed", "reference"):
        server = inprocess_server(fresh=True, QUANTIZE="none", DEVICE="cpu", CPU_KERNELS=kernels)
        try:
            model = server.engine.loaded.model
            assert isinstance(model.get_output_embeddings(), PackedLinear) == (kernels == "packed")
            assert any(isinstance(m, Conv1D) for m in model.modules()) == (kernels == "reference")
            answer = server.client.post("/generate", json={"text": {"plain": PROMPT}, "max_new_tokens": 16})
            assert answer.status_code == 200, answer.get_data(as_text=True)
            texts[kernels] = answer.get_json()["sentences"][0]["generated_text"]
        finally:
            server.stop()
    assert texts["packed"] == texts["reference"]


def openai_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def test_greedy_text_is_the_int8_models_generate(int8_server, int8_models):
    """The server decodes with the int8 model: its greedy text is that model's `generate`."""
    loaded = int8_models[int8_server.arch]
    tokenizer = loaded.tokenizer
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    got = continuation(generate(int8_server.url, PROMPT, max_new_tokens=24), PROMPT)
    assert got == expected


def test_stream_gives_the_same_text(int8_server):
    whole = continuation(generate(int8_server.url, PROMPT, max_new_tokens=20), PROMPT)
    body = {"text": {"plain": PROMPT}, "max_new_tokens": 20}
    with requests.post(int8_server.url + "/generate_stream", json=body, stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith(b"data: ")]
    assert "".join(e.get("text", "") for e in events) == whole
    assert events[-1]["done"] and 1 <= events[-1]["usage"]["completion_tokens"] <= 20


def test_seeded_sampling_repeats_and_seeds_differ(int8_server):
    client = openai_client(int8_server)
    model_id = client.models.list().data[0].id

    def sample(seed: int) -> list[str]:
        completion = client.completions.create(model=model_id, prompt="Hello", max_tokens=24, n=2, seed=seed,
                                               temperature=1.0, extra_body={"ignore_eos": True})
        return [choice.text for choice in completion.choices]

    first = sample(42)
    assert sample(42) == first
    assert sample(43) != first
    assert first[0] != first[1]


def test_logprobs_are_the_int8_models_and_near_float32(int8_server, int8_models, tiny_models):
    """Prompt log-probabilities scored by the server are the int8 model's, and near float32's."""
    loaded = int8_models[int8_server.arch]
    client = openai_client(int8_server)
    model_id = client.models.list().data[0].id
    scored = client.completions.create(model=model_id, prompt=PROMPT, echo=True, max_tokens=0, logprobs=2)
    got = scored.choices[0].logprobs.token_logprobs[1:]

    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    reference = load_model(settings(tiny_models.folders[int8_server.arch], device="cpu")).model

    def prompt_logprobs(model) -> list[float]:
        with torch.inference_mode():
            logits = model(ids).logits[0, :-1].float()
        return logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0].tolist()

    assert len(got) == ids.shape[1] - 1
    assert got == pytest.approx(prompt_logprobs(loaded.model), abs=1e-3)
    assert got == pytest.approx(prompt_logprobs(reference), abs=0.05)

    # Log-probabilities of generated tokens, streamed: the chosen token among the alternatives.
    chunks = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=6, logprobs=2, stream=True,
                                       extra_body={"ignore_eos": True})
    entries = [(t, lp, top) for c in chunks if c.choices[0].logprobs
               for t, lp, top in zip(c.choices[0].logprobs.tokens, c.choices[0].logprobs.token_logprobs,
                                     c.choices[0].logprobs.top_logprobs)]
    assert len(entries) == 6
    for token, logprob, top in entries:
        # (Different byte-level tokens may print alike, e.g. as "\ufffd", so `top` is checked by name only.)
        assert logprob <= 0 and token in top and all(value <= 0 for value in top.values())


def cancelled_requests(server) -> float:
    """The server's own count of generation requests dropped because their client went away."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(server.url + "/metrics", timeout=10).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return next(s.value for s in samples if s.name == "gpt_server_requests_cancelled_total")


@pytest.fixture(scope="module", autouse=True)
def _boot_real_servers_early(boot_early, tiny_models):
    for arch in ARCHITECTURES:
        boot_early("int8_real_server", MODEL_ID=tiny_models.repo_ids[arch], QUANTIZE="int8")


@pytest.fixture(scope="module", params=ARCHITECTURES)
def int8_real_server(request, start_server, tiny_models):
    server = start_server(shared=True, MODEL_ID=tiny_models.repo_ids[request.param], QUANTIZE="int8")
    server.arch = request.param
    yield server
    server.stop()


def test_a_cancelled_stream_is_dropped_from_the_batch(int8_real_server, tiny_models):
    server = int8_real_server
    before = cancelled_requests(server)
    # The rest of the context, end-of-text ignored: it runs until the client leaves.
    body = {"model": tiny_models.repo_ids[server.arch], "prompt": "Hello", "max_tokens": None,
            "stream": True, "ignore_eos": True, "seed": 1}
    response = requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=60)
    next(line for line in response.iter_lines() if line.startswith(b"data: "))
    response.close()
    # The first event may reach the client a moment before its row counts in the batch: an empty batch
    # alone would not say the engine has seen the cancellation, its count does.
    assert wait_until(lambda: cancelled_requests(server) == before + 1, timeout=30), "not cancelled: it ran to its end"
    assert wait_until(lambda: batch_size(server.url) == 0, timeout=30), "the cancelled request stayed"
    assert cancelled_requests(server) == before + 1
    assert continuation(generate(server.url, "Still", max_new_tokens=4), "Still")


# ---- where it does not apply ---------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"DEVICE": "cuda"}, "setting QUANTIZE='int8' is invalid: int8 runs on the CPU only"),
    ({"DEVICE": "cuda:1"}, "use DEVICE=cpu with it, or QUANTIZE=none on a GPU"),
    ({"DTYPE": "bfloat16"}, "use DTYPE=float32 (or auto) with it, not DTYPE=bfloat16"),
])
def test_settings_it_cannot_work_with_are_refused_at_boot(start_server, values, message):
    server = start_server(QUANTIZE="int8", wait=False, **values)
    assert wait_for_exit(server) != 0
    assert message in server.log


def test_an_unknown_method_is_refused_at_boot(start_server):
    server = start_server(QUANTIZE="int4", wait=False)
    assert wait_for_exit(server) != 0
    assert "setting QUANTIZE='int4' is invalid: Input should be 'none', 'int8' or 'auto'" in server.log


@pytest.fixture(scope="module")
def tiny_opt(tiny_models, tmp_path_factory):
    """A tiny OPT model (an architecture int8 here does not cover), with the tiny GPT-2's tokenizer."""
    from transformers import OPTConfig, OPTForCausalLM

    folder = tmp_path_factory.mktemp("tiny-opt")
    gpt2 = tiny_models.folders["gpt2"]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (gpt2 / name).exists():
            shutil.copy(gpt2 / name, folder / name)
    config = OPTConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                       max_position_embeddings=256, word_embed_proj_dim=32)
    OPTForCausalLM(config).save_pretrained(folder)
    return folder


def test_an_architecture_it_does_not_cover_is_refused_at_boot(start_server, tiny_opt):
    server = start_server(MODEL_ID=str(tiny_opt), QUANTIZE="int8", wait=False)
    assert wait_for_exit(server) != 0
    assert "QUANTIZE=int8 supports GPT-2, GPT-Neo, GPT-J models; this model is 'opt'" in server.log
    assert "Use QUANTIZE=none" in server.log
