# Shared by edgelm.sh and test.sh: make (or refresh) .venv with edgelm installed.
# edgelm_venv EXTRAS   e.g. "" or "[test]"
edgelm_venv() {
  local extras="$1"
  local root venv stamp py
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="${EDGELM_VENV:-$root/.venv}"
  stamp="$venv/.edgelm-installed${extras//[^a-z]/-}"
  py="${PYTHON:-python3}"
  if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "edgelm needs Python >= 3.10 (found: $("$py" --version 2>&1))" >&2
    exit 1
  fi
  if [ ! -x "$venv/bin/python" ]; then
    echo "setting up $venv (first run)..." >&2
    "$py" -m venv "$venv"
  fi
  # Reinstall when the package definition or native sources are newer than the last install.
  if [ ! -f "$stamp" ] || [ -n "$(find "$root/pyproject.toml" "$root/setup.py" "$root/edgelm/_native" -newer "$stamp" 2>/dev/null | head -1)" ]; then
    echo "installing edgelm$extras into $venv (compiles the native kernels; log: $venv/install.log)..." >&2
    if ! { "$venv/bin/python" -m pip install --upgrade pip && "$venv/bin/python" -m pip install -e "$root$extras"; } \
         >"$venv/install.log" 2>&1; then
      tail -n 40 "$venv/install.log" >&2
      echo "edgelm: installation failed; the full log is $venv/install.log" >&2
      exit 1
    fi
    # The vision tower's parity tests build timm's MobileNet-V5. timm's declared dependencies
    # would pull a CUDA torchvision that breaks the CPU torch beside it, so it comes without
    # them (its other needs, pyyaml and huggingface_hub, arrive with transformers).
    if [[ "$extras" == *test* ]] && ! "$venv/bin/python" -m pip install --no-deps "timm>=1.0.16" >>"$venv/install.log" 2>&1; then
      echo "edgelm: could not install timm (the vision-tower parity tests will skip); see $venv/install.log" >&2
    fi
    touch "$stamp"
  fi
  EDGELM_VENV="$venv"
}
