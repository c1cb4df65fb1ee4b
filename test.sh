#!/usr/bin/env bash
# The whole test suite: ./test.sh  (extra arguments go to pytest)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/scripts/venv.sh"
edgelm_venv "[test]"
cd "$here"
set +e
"$EDGELM_VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; failing" >&2
  exit 1
fi
exit "$rc"
