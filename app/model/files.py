"""Locating a model's files: a local folder, or its snapshot in the Hugging Face cache (never the network).

The cache is read with huggingface_hub's own lookups, which know its layout (refs, snapshots, commits).
Imports neither torch nor transformers at module level: the server's pre-fork checks use it.
"""

from __future__ import annotations

import json
import os

from app.model.errors import ModelLoadError
from app.settings import Settings


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def cached_file(model_id: str, filename: str, revision: str | None = None) -> str | None:
    """The path of one file of a cached repo (at `revision`: a branch, tag or commit), None if not cached."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(model_id, filename, revision=revision)
    except ValueError:  # not a valid repo id (a path, say): not in the cache
        return None
    return path if isinstance(path, str) else None


def _in_cache(model_id: str, revision: str | None = None) -> bool:
    """Whether the HF cache holds this repo (at `revision`: a branch or tag it recorded, or a commit)."""
    if revision is not None:
        return cached_file(model_id, "config.json", revision) is not None
    from huggingface_hub.file_download import repo_folder_name

    try:
        return os.path.isdir(os.path.join(hf_cache_dir(), repo_folder_name(repo_id=model_id, repo_type="model")))
    except ValueError:
        return False


def _first_line(cause: Exception) -> str:
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def not_found_message(settings: Settings, cause: Exception) -> str:
    model_id, revision = settings.model_id, settings.model_revision
    if settings.model_is_local_folder:
        return (
            f"MODEL_ID={model_id!r} is a folder, but no model loads from it ({_first_line(cause)}); it needs the "
            "config.json, weights and tokenizer files that `save_pretrained` writes"
        )
    if model_id.startswith(("/", "./", "../", "~")):
        return f"MODEL_ID={model_id!r} looks like a folder, but there is no such folder"
    cache = f"the Hugging Face cache at {hf_cache_dir()} (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')})"
    option = f"--revision {revision} " if revision != "main" else ""
    prefetch = f"`python scripts/prefetch_model.py {option}{model_id}`"
    if not _in_cache(model_id):
        # Not the library's reason: it talks about connecting to the hub, which this server never does.
        return (
            f"model {model_id!r} was not found: it is neither a local folder nor in {cache}. Prefetch it with "
            f"{prefetch} (or rebuild the image with MODEL_ID={model_id})."
        )
    if not _in_cache(model_id, revision):
        return (
            f"model {model_id!r} is in {cache}, but not at revision {revision!r} (MODEL_REVISION). Prefetch that "
            f"revision with {prefetch}."
        )
    # The files are there but do not load: the library's reason is the useful part.
    return (
        f"model {model_id!r} (revision {revision!r}) is in {cache} but does not load: {_first_line(cause)}. "
        f"Prefetch it again with {prefetch}."
    )


def model_folder(settings: Settings) -> str:
    """The folder holding the model's files: MODEL_ID itself, or its snapshot in the HF cache."""
    if settings.model_is_local_folder:
        return settings.model_id
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(settings.model_id, revision=settings.model_revision, local_files_only=True)
    except Exception as exc:  # the hub client raises several types for "not in the cache"
        raise ModelLoadError(not_found_message(settings, exc)) from exc


def load_config(settings: Settings, folder: str | None = None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            folder or settings.model_id, revision=settings.model_revision, local_files_only=True,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(not_found_message(settings, exc)) from exc


def check_model_available(settings: Settings) -> None:
    """Fail fast, before the server forks its worker, when the model's config is not on this machine or is
    not a model's config. Reads the file with the standard library only (no torch, no transformers); the
    worker loads the rest and reports what is missing there the same way."""
    if settings.model_is_local_folder:
        path = os.path.join(settings.model_id, "config.json")
        if not os.path.isfile(path):
            raise ModelLoadError(not_found_message(settings, FileNotFoundError(f"there is no {path}")))
    else:
        path = cached_file(settings.model_id, "config.json", settings.model_revision)
        if path is None:
            raise ModelLoadError(not_found_message(settings, FileNotFoundError("config.json is not in the cache")))
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(not_found_message(settings, ValueError(f"{path} cannot be read: {exc}"))) from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadError(not_found_message(settings, ValueError(f"{path} has no model_type")))
