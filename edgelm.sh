#!/usr/bin/env bash
# The main job: ./edgelm.sh run "The capital of France is"
# The first run creates .venv with edgelm (compiling its native kernels); the first
# generation prepares the default model (Gemma 3 270M) in the user cache dir.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/scripts/venv.sh"
edgelm_venv ""
exec "$EDGELM_VENV/bin/edgelm" "$@"
