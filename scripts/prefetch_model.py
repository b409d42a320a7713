"""Put a model into the Hugging Face cache so that the server can load it offline.

Two ways to fill the cache (the directory that `HF_HOME/hub` points to):

    # download MODEL_ID at a revision from the Hugging Face hub (only the files needed to load it)
    python scripts/prefetch_model.py --revision main EleutherAI/gpt-neo-125M

    # install a local model folder (save_pretrained / git checkout) under a repo id, no network
    python scripts/prefetch_model.py --from-folder ./my-model --cache-dir /models/hub my-org/my-model

Afterwards, with `HF_HUB_OFFLINE=1` and the same cache, both
`AutoModelForCausalLM.from_pretrained(MODEL_ID, revision=REV)` and
`AutoTokenizer.from_pretrained(MODEL_ID, revision=REV)` find the model by its id.

Files taken: the config, the generation config, the tokenizer files and the weights, as
`*.safetensors` when the repository (or folder) has them, else as PyTorch `*.bin`; never
Flax/TF/ONNX weights or sub-folders. The download reports its progress as whole lines every few
seconds (bytes so far, rate, time left), which a build log (BuildKit, CI) shows as they come.

Token for private or gated repositories: the `HF_TOKEN` environment variable, else the file
`/run/secrets/hf_token` (a BuildKit secret: `docker build --secret id=hf_token,env=HF_TOKEN`),
else the token saved by `hf auth login`. The token is only read, never written anywhere.

Defaults come from the environment: MODEL_ID, MODEL_REVISION (default `main`), and the cache
directory from HF_HUB_CACHE or HF_HOME (`$HF_HOME/hub`), like huggingface_hub itself.

This script depends only on huggingface_hub and the standard library, so the images can run it in
an early layer, before the application code is copied.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import pathlib
import re
import shutil
import sys

SECRET_TOKEN_FILE = pathlib.Path("/run/secrets/hf_token")

# Files a causal LM and its tokenizer may need besides the weights (exact names, top level only).
SUPPORT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
SAFETENSORS_FILES = ("*.safetensors", "model.safetensors.index.json")
PYTORCH_FILES = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
# Stored through git-lfs on the hub: their cache blob is named by sha256, other files by git blob sha1.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".msgpack", ".h5", ".onnx", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024

COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")


class PrefetchError(Exception):
    """An error with a message for the user; the script prints it on one line and exits 1."""


def select_files(names: list[str]) -> list[str]:
    """The files to take from a repository listing: support files plus one weight format."""
    top = [n for n in names if "/" not in n]

    def matching(patterns: tuple[str, ...]) -> list[str]:
        return [n for n in top if any(fnmatch.fnmatchcase(n, p) for p in patterns)]

    weights = matching(SAFETENSORS_FILES)
    if not any(n.endswith(".safetensors") for n in weights):
        weights = matching(PYTORCH_FILES)
    if not any(n.endswith((".safetensors", ".bin")) for n in weights):
        raise PrefetchError("no PyTorch weights (*.safetensors or pytorch_model*.bin) at the top level")
    if "config.json" not in top:
        raise PrefetchError("no config.json at the top level")
    return sorted(set(weights) | {n for n in top if n in SUPPORT_FILES})


def read_token() -> str | None:
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    try:
        token = SECRET_TOKEN_FILE.read_text().strip()
    except OSError:
        return None
    return token or None


def default_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


# --------------------------------------------------------------------------- from the hub


def line_progress_class():
    """A progress bar that prints a whole line every PROGRESS_SECONDS instead of redrawing one with
    carriage returns, which build logs do not show until the download is over."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class LineProgress(hub_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["mininterval"] = PROGRESS_SECONDS
            kwargs["file"] = sys.stdout
            super().__init__(*args, **kwargs)

        def display(self, msg=None, pos=None):
            if not self.disable:
                print(f"prefetch: {self.format_meter(**self.format_dict)}", flush=True)
            return True

    return LineProgress


PROGRESS_SECONDS = 5.0


def download(model_id: str, revision: str, cache_dir: str) -> pathlib.Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = read_token()
    where = f"{model_id!r} at revision {revision!r}"
    try:
        names = HfApi().list_repo_files(model_id, revision=revision, token=token)
        files = select_files(names)
        print(f"prefetch: {where}: {', '.join(files)}", flush=True)
        path = snapshot_download(
            model_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=files,
            token=token,
            tqdm_class=line_progress_class(),
        )
    except PrefetchError as exc:
        raise PrefetchError(f"{where}: {exc}") from None
    except GatedRepoError:
        raise PrefetchError(
            f"{where} is gated: accept its terms on huggingface.co and pass a token with access "
            "(HF_TOKEN, or the build secret hf_token)"
        ) from None
    except RevisionNotFoundError:
        raise PrefetchError(f"{model_id!r} has no revision {revision!r} (a branch, tag or commit hash)") from None
    except RepositoryNotFoundError:
        raise PrefetchError(
            f"no model {model_id!r} on the hub (or it is private and no valid token was given: HF_TOKEN)"
        ) from None
    except HFValidationError as exc:
        raise PrefetchError(f"invalid model id {model_id!r}: {exc}".splitlines()[0]) from None
    except LocalEntryNotFoundError as exc:
        raise PrefetchError(f"{where}: the hub cannot be reached ({first_line(exc)})") from None
    except HfHubHTTPError as exc:
        raise PrefetchError(f"{where}: hub error: {first_line(exc)}") from None
    except Exception as exc:  # connection errors (the hub's HTTP client has its own classes), full disk, ...
        hint = " (is the hub reachable? set HTTPS_PROXY behind a proxy)" if "connect" in type(exc).__name__.lower() else ""
        raise PrefetchError(f"{where}: {type(exc).__name__}: {first_line(exc)}{hint}") from None
    return pathlib.Path(path)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- from a local folder


def git_blob_sha1(path: pathlib.Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def blob_id(path: pathlib.Path) -> str:
    """The name huggingface_hub gives the file's blob: sha256 for LFS files, git sha1 otherwise."""
    if path.name.endswith(LFS_SUFFIXES) or path.stat().st_size >= LFS_MIN_SIZE:
        return sha256(path)
    return git_blob_sha1(path)


def repo_folder(cache_dir: pathlib.Path, model_id: str) -> pathlib.Path:
    return cache_dir / "--".join(["models", *model_id.split("/")])


def install_folder(folder: pathlib.Path, model_id: str, revision: str, cache_dir: str) -> pathlib.Path:
    """Lay `folder` out as the hub cache would after downloading `model_id` at `revision`.

    models--org--name/blobs/<blob id>, snapshots/<commit>/<file> -> ../../blobs/<blob id>,
    refs/<revision> = <commit>. The commit is the revision itself when it is a commit hash,
    else a hash of the selected files, so installing the same folder twice gives the same tree.
    """
    if not folder.is_dir():
        raise PrefetchError(f"--from-folder {str(folder)!r} is not a directory")
    if not model_id or model_id.startswith(("/", ".")) or model_id.count("/") > 1 or ".." in model_id:
        raise PrefetchError(f"invalid model id {model_id!r}: expected 'name' or 'org/name'")
    names = [p.name for p in folder.iterdir() if p.is_file()]
    try:
        files = select_files(names)
    except PrefetchError as exc:
        raise PrefetchError(f"--from-folder {str(folder)!r}: {exc}") from None

    blobs = {name: blob_id(folder / name) for name in files}
    if COMMIT_HASH.fullmatch(revision):
        commit = revision
    else:
        listing = "".join(f"{name}\0{blobs[name]}\n" for name in files)
        commit = hashlib.sha1(f"prefetch_model.py from-folder\n{listing}".encode()).hexdigest()

    storage = repo_folder(pathlib.Path(cache_dir), model_id)
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in files:
        blob = storage / "blobs" / blobs[name]
        if not blob.exists():
            tmp = blob.with_name(blob.name + ".incomplete")
            shutil.copyfile(folder / name, tmp)
            os.replace(tmp, blob)
        link = snapshot / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(pathlib.Path("..", "..", "blobs", blobs[name]))
    if commit != revision:
        ref = storage / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    return snapshot


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Defaults: MODEL_ID, MODEL_REVISION and HF_HOME / HF_HUB_CACHE from the environment.",
    )
    parser.add_argument("model_id", nargs="?", default=os.environ.get("MODEL_ID") or None,
                        help="hub repo id, e.g. EleutherAI/gpt-neo-125M (default: $MODEL_ID)")
    parser.add_argument("--revision", default=os.environ.get("MODEL_REVISION") or "main",
                        help="branch, tag or commit hash (default: $MODEL_REVISION or main)")
    parser.add_argument("--cache-dir", default=None,
                        help="hub cache directory (default: $HF_HUB_CACHE, else $HF_HOME/hub)")
    parser.add_argument("--from-folder", type=pathlib.Path, default=None, metavar="DIR",
                        help="install this local model folder under MODEL_ID instead of downloading")
    args = parser.parse_args(argv)
    if not args.model_id:
        parser.error("no model id: give MODEL_ID as an argument or in the environment")
    cache_dir = args.cache_dir or default_cache_dir()

    try:
        if args.from_folder is not None:
            path = install_folder(args.from_folder, args.model_id, args.revision, cache_dir)
            action = f"installed {str(args.from_folder)!r} as"
        else:
            path = download(args.model_id, args.revision, cache_dir)
            action = "downloaded"
    except PrefetchError as exc:
        print(f"prefetch_model: error: {exc}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in path.iterdir())  # follows the symlinks into blobs/
    print(f"prefetch: {action} {args.model_id}@{args.revision} -> {path} ({size / 1e6:.1f} MB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
