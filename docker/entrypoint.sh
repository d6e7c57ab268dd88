#!/bin/sh
# Container entrypoint: start ONE server process (one backbone in memory) and replace this shell
# with it (exec), so SIGTERM from `docker stop` reaches uvicorn and it shuts down gracefully.
#
#   docker run IMAGE                  -> frozenlm serve
#   docker run IMAGE --port 9000      -> frozenlm serve --port 9000
#   docker run IMAGE frozenlm tasks   -> any other command, run as given
set -eu

store="${FROZENLM_STORE_DIR:-/data/modules}"
if [ -d "$store" ] && [ ! -w "$store" ]; then
    echo "entrypoint: $store is not writable by uid $(id -u); uploads will fail." \
         "Use a named volume, or chown the mounted folder to uid $(id -u)." >&2
fi

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    exec frozenlm serve "$@"
fi
exec "$@"
