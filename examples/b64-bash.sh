#!/bin/sh
# Print a request body whose prompt, the start of a shell function, is sent base64-encoded (in_64),
# which keeps its line breaks, quotes and backslashes out of JSON's way. Use it with
#   scripts/curl_from_encoded examples/b64-bash.sh
# GNU base64 wraps its output every 76 characters; the line breaks are turned into spaces here,
# and the server ignores whitespace inside in_64.
prompt=$(base64 <<'CODE' | tr '\n' ' '
#!/bin/bash
# Back up a folder into a dated tar.gz archive and keep only the newest seven archives.
backup_folder() {
    local source="$1" target="${2:-$HOME/backups}"
CODE
)

cat <<JSON
{
    "text": { "in_64": "$prompt" },
    "do_sample": true,
    "top_k": 10,
    "temperature": 0.1,
    "max_length": 256
}
JSON
