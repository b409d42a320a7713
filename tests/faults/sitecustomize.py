"""Injects faults into a server process started with this folder on PYTHONPATH (tests only).

The server's own code has no test hooks: a fault is raised where a real one would surface, from
inside the model's forward pass (as a CUDA out-of-memory error does).

- FAULT_PROMPT_TOKEN=N: a forward pass whose input holds token id N at more than one position
  (a prefill of a prompt containing that token) raises torch.OutOfMemoryError.
- FAULT_AT_LENGTH=L: a forward pass whose attention mask is exactly L columns wide (a decoding
  step of a batch whose longest sequence reaches L) raises torch.OutOfMemoryError.
- FAULT_KILL_AT_LENGTH=L: the same, but raises SystemExit, which kills the engine thread.
- FAULT_RESTART_AFTER_SECONDS=S: a worker whose engine died exits to be replaced after S seconds
  instead of the server's RESTART_AFTER_ENGINE_DEATH_SECONDS (what it does meanwhile is unchanged).
- FAULT_HOLD_TORCH_UNTIL=FILE: the process's first `import torch` waits until FILE exists (a slow
  disk or a cold cache, for as long as a test needs).
"""

import os
import sys
from time import sleep as native_sleep  # taken before gevent patches `time` in the server's worker


def raise_injected_fault(input_ids, attention_mask, prompt_token=None, at_length=None, kill_at_length=None) -> None:
    """Raise the fault these settings ask for, if this forward pass of the whole model is where it belongs
    (also used by the tests for an in-process engine's model)."""
    import torch

    if input_ids is None:
        return
    width = attention_mask.shape[-1] if attention_mask is not None else None
    if prompt_token is not None and (input_ids == int(prompt_token)).sum() > 1:
        raise torch.OutOfMemoryError("injected: out of memory during prefill")
    if at_length is not None and width == int(at_length):
        raise torch.OutOfMemoryError("injected: out of memory during a decoding step")
    if kill_at_length is not None and width == int(kill_at_length):
        raise SystemExit("injected: engine thread killed")


def _install() -> None:
    import torch

    faults = {"prompt_token": os.environ.get("FAULT_PROMPT_TOKEN"), "at_length": os.environ.get("FAULT_AT_LENGTH"),
              "kill_at_length": os.environ.get("FAULT_KILL_AT_LENGTH")}
    original = torch.nn.Module.__call__

    def faulty_call(self, *args, **kwargs):
        if hasattr(self, "lm_head"):  # the engine's call of the whole model
            raise_injected_fault(kwargs.get("input_ids"), kwargs.get("attention_mask"), **faults)
        return original(self, *args, **kwargs)

    torch.nn.Module.__call__ = faulty_call


if any(os.environ.get(k) for k in ("FAULT_PROMPT_TOKEN", "FAULT_AT_LENGTH", "FAULT_KILL_AT_LENGTH")):
    _install()


class _AroundImport:
    """A finder that only wraps a module's execution: `name` is found as usual (a mere lookup,
    `importlib.util.find_spec(name)`, runs nothing more), and executing it calls `around(execute, module)`,
    where `execute(module)` is the loader's own step."""

    def __init__(self, name: str, around):
        self.name, self.around = name, around

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(name, path, target)
            if spec is not None:
                execute = spec.loader.exec_module
                spec.loader.exec_module = lambda module: self.around(execute, module)
                return spec
        return None


def _restart_after(execute, module) -> None:
    """How long a worker whose engine died goes on answering 503 before it exits to be replaced."""
    execute(module)
    module.RESTART_AFTER_ENGINE_DEATH_SECONDS = float(os.environ["FAULT_RESTART_AFTER_SECONDS"])


def _hold_until_the_gate_exists(execute, module) -> None:
    while not os.path.exists(os.environ["FAULT_HOLD_TORCH_UNTIL"]):
        native_sleep(0.05)
    execute(module)


if os.environ.get("FAULT_RESTART_AFTER_SECONDS"):
    sys.meta_path.insert(0, _AroundImport("app.factory", _restart_after))

if os.environ.get("FAULT_HOLD_TORCH_UNTIL"):
    sys.meta_path.insert(0, _AroundImport("torch", _hold_until_the_gate_exists))
