#!/usr/bin/env bash
# The whole test suite: ./test.sh  (extra arguments go to pytest)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/scripts/venv.sh"
edgelm_venv "[test]"
# The web-page test drives a real headless Chromium (Debian's chromium + chromium-driver).
if ! command -v chromedriver >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && [ -z "${EDGELM_NO_APT:-}" ]; then
  echo "installing chromium and chromium-driver for the web test..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || echo "could not install chromium; the browser test will skip" >&2
fi
# The audio front end's tests feed it speech that espeak-ng synthesizes offline.
if ! command -v espeak-ng >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && [ -z "${EDGELM_NO_APT:-}" ]; then
  echo "installing espeak-ng for the audio tests..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng) >/dev/null 2>&1 \
    || echo "could not install espeak-ng; the speech tests will skip" >&2
fi
# tests/test_neon.py cross-compiles the kernels for aarch64 and runs them under qemu-user.
if { ! command -v qemu-aarch64 >/dev/null 2>&1 || ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1; } && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && [ -z "${EDGELM_NO_APT:-}" ]; then
  echo "installing g++-aarch64-linux-gnu and qemu-user for the NEON kernel tests..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu qemu-user) \
    >/dev/null 2>&1 || echo "could not install them; the NEON tests will skip" >&2
fi
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
