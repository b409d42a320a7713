"""Text-generation server for Hugging Face causal language models (GPT-2, GPT-Neo, GPT-J, ...).

The application factory is `app.factory.create_app`; it is not imported here, so that importing a
light module (`app.settings`, say) does not load torch and transformers.
"""

from __future__ import annotations

import os

# Weights come from the prefetched cache or a local folder, never from the network at run time.
# huggingface_hub reads these when it is first imported, so they are set before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
