#!/bin/sh
# Entry point of the images: make sure the model the image was built with is in the model cache,
# then run the command (`python -m app`).
#
# The weights are baked into the image at $HF_HOME, the path on which compose mounts the
# model-cache volume. Docker fills an empty volume from the image on first start, but never touches
# a volume that already holds files: after a rebuild with another MODEL_ID (or revision) the volume
# still holds the old model only. The image therefore keeps its model a second time, as hard links
# (no extra space), at $MODEL_SEED, outside the volume; what the cache lacks is copied from there.
set -eu

seed="${MODEL_SEED:-/opt/model-seed}/hub"
cache="${HF_HUB_CACHE:-${HF_HOME:-/models}/hub}"

# True when the cache lacks a file of the seed's snapshots or its refs point elsewhere.
needs_seeding() {
    for ref in $(cd "$1" && find refs -type f); do
        cmp -s "$1/$ref" "$2/$ref" || return 0
    done
    for file in $(cd "$1" && find snapshots -mindepth 2); do
        [ -e "$2/$file" ] || return 0
    done
    return 1
}

seed_repo() {
    mkdir -p "$2/blobs" "$2/snapshots" "$2/refs" || return 1
    for blob in "$1"/blobs/*; do
        dest="$2/blobs/${blob##*/}"
        # Copy under a temporary name first: an interrupted copy never passes for a complete blob.
        [ -e "$dest" ] || { cp "$blob" "$dest.seeding" && mv "$dest.seeding" "$dest"; } || return 1
    done
    cp -R -P --remove-destination "$1/snapshots/." "$2/snapshots/" && cp -R "$1/refs/." "$2/refs/"
}

if [ -d "$seed" ] && [ "$(readlink -f "$seed")" != "$(readlink -f "$cache")" ]; then
    for repo in "$seed"/models--*; do
        [ -d "$repo" ] || continue
        dest="$cache/${repo##*/}"
        if needs_seeding "$repo" "$dest"; then
            echo "docker-entrypoint: copying ${repo##*/} from the image into the model cache $cache" >&2
            seed_repo "$repo" "$dest" \
                || echo "docker-entrypoint: warning: could not copy the model into $cache" >&2
        fi
    done
fi

exec "$@"
