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

# oneDNN (float32's packed layers) keeps every matrix-product shape it has run ready for the next time,
# each with its working memory, up to 1,024 of them: as batch sizes and prompt lengths vary, the
# server's memory crept up with them (GPT-2 small in float32, three bursts of 16 requests: +96 MB over
# the loaded model; with 64 kept, +58 MB, and decoding steps as fast, where keeping none made them 25-40 %
# slower). Read by torch's oneDNN when it first runs, so set before anything imports torch.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
