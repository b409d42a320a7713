#!/bin/sh
# Entry point of the images: serve the model the image was built with, from the model cache, then
# run the command (`python -m app`).
#
# The image keeps its model at $MODEL_SEED/hub (a Hugging Face cache) and records the name it is
# served under in $MODEL_SEED/MODEL_ID (and the revision in MODEL_REVISION). The model cache
# ($HF_HOME/hub, compose's model-cache volume) gets a symbolic link to the seed's repository
# folder, not a copy: the weights are stored once, in the image. After a rebuild with another model
# the link of the old one points at nothing; it is removed here, so a swap leaves nothing stale in
# the volume. A cache that cannot be written (a read-only mount) is bypassed: the seed is the cache.
set -eu

seed_dir="${MODEL_SEED:-/opt/model-seed}"
seed="$seed_dir/hub"
cache="${HF_HUB_CACHE:-${HF_HOME:-/models}/hub}"

# The baked model unless the environment names another (an empty value counts as unset).
if [ -z "${MODEL_ID:-}" ] && [ -f "$seed_dir/MODEL_ID" ]; then
    MODEL_ID="$(cat "$seed_dir/MODEL_ID")"
    MODEL_REVISION="${MODEL_REVISION:-$(cat "$seed_dir/MODEL_REVISION")}"
fi
[ -n "${MODEL_ID:-}" ] && export MODEL_ID
[ -n "${MODEL_REVISION:-}" ] && export MODEL_REVISION

link_seed() {
    mkdir -p "$cache" 2>/dev/null && [ -w "$cache" ] || return 1
    # Links left by an earlier image whose model this one does not have.
    for entry in "$cache"/models--*; do
        if [ -L "$entry" ] && [ ! -e "$entry" ]; then
            case "$(readlink "$entry")" in
                "$seed"/*) rm -f "$entry" && echo "docker-entrypoint: removed ${entry##*/} (an earlier image's model) from $cache" >&2 ;;
            esac
        fi
    done
    for repo in "$seed"/models--*; do
        [ -d "$repo" ] || continue
        dest="$cache/${repo##*/}"
        [ "$(readlink "$dest" 2>/dev/null)" = "$repo" ] && continue
        # A real folder of the same name is a copy left by an older image (or a download of the same
        # repo): the image's model replaces it.
        rm -rf "$dest" && ln -s "$repo" "$dest" || return 1
        echo "docker-entrypoint: ${repo##*/} linked from the image into $cache" >&2
    done
}

if [ -d "$seed" ] && [ "$(readlink -f "$seed")" != "$(readlink -f "$cache")" ]; then
    if ! link_seed; then
        echo "docker-entrypoint: $cache is not writable: loading the model from the image ($seed)" >&2
        export HF_HUB_CACHE="$seed"
    fi
fi

# jemalloc returns freed memory to the system (see the Dockerfile): preloaded when the image has it,
# unless LD_PRELOAD is set, even to nothing (`-e LD_PRELOAD=` keeps glibc's allocator).
if [ -z "${LD_PRELOAD+set}" ]; then
    for lib in /usr/lib/*/libjemalloc.so.2; do
        if [ -e "$lib" ]; then export LD_PRELOAD="$lib"; break; fi
    done
fi

exec "$@"
