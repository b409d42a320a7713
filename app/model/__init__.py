"""The served model: everything between the settings and a model object the engine can run.

- `errors`: the error types and the messages both sides raise (imports no torch).
- `preflight`: the checks run before gunicorn forks its worker (imports no torch, no transformers).
- `files`: locating the model's files (a local folder or the Hugging Face cache) and its config.
- `device`: the device and dtype a setting asks for, and the attention each model type needs there.
- `fit`: what the model needs in memory, what the device has, and the plan (or the refusal).
- `safetensors_stream`: the loader that converts weights chunk by chunk (peak about 1.0x the weights).
- `int8`: QUANTIZE=int8, linear layers with int8 weights on the CPU.
- `loader`: `load_model`, tying the above together in the worker.

Nothing is imported here, so `import app.model.preflight` stays free of torch.
"""
