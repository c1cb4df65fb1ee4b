"""`edgelm convert` and the bundle writer keep data safe: the output is never one of the
source's files, killed writers' temp files are cleaned up, a failed write is a clear I/O
error (exit 5) that leaves nothing behind, and bundles get the umask's permissions."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgelm.cli.main import entry
from edgelm.convert import convert, load_source
from edgelm.errors import BadInputError, OutputError
from edgelm.format.bundle import TensorPlan, remove_stale_temps, write_bundle
from edgelm.quant.schemes import quantize

from .conftest import ROOT

sys.path.insert(0, str(Path(__file__).parent))
import hf_fixtures as fx  # noqa: E402


def run_entry(*args) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = entry([str(a) for a in args])
    return rc, err.getvalue()


def digest(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def tiny_gemma3_gguf(path: Path) -> Path:
    """A valid one-layer Gemma 3 GGUF with a small SentencePiece-style vocabulary."""
    import gguf

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types = [3] * 6
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    tokens += ["\u2581", "h", "e", "l", "o", "\u2581hello"]
    types += [1] * 6
    vocab, hidden, heads, kv, hd, ff = len(tokens), 32, 2, 1, 16, 64
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(1)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_context_length(256)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(8)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    per = {"attn_norm": (hidden,), "attn_q": (heads * hd, hidden), "attn_k": (kv * hd, hidden),
           "attn_v": (kv * hd, hidden), "attn_q_norm": (hd,), "attn_k_norm": (hd,), "attn_output": (hidden, heads * hd),
           "post_attention_norm": (hidden,), "ffn_norm": (hidden,), "ffn_gate": (ff, hidden), "ffn_up": (ff, hidden),
           "ffn_down": (hidden, ff), "post_ffw_norm": (hidden,)}
    shapes.update({f"blk.0.{k}.weight": v for k, v in per.items()})
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny sharded Hugging Face checkpoint: index, two or more shards, tokenizer, configs."""
    d = fx.make_tiny_gemma3(tmp_path_factory.mktemp("src") / "ck", layers=3, max_shard_size="200KB")
    assert len(list(d.glob("*.safetensors"))) >= 2 and (d / "model.safetensors.index.json").is_file()
    return d


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return tiny_gemma3_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# ----------------------------------------------------------------------------- the output is never a source file


def test_sources_list_every_file_they_read(hf_dir, gguf_file):
    src = load_source(hf_dir)
    names = {p.name for p in src.input_files}
    shards = {p.name for p in hf_dir.glob("*.safetensors")}
    assert shards | {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "generation_config.json"} <= names
    assert all(p.parent == hf_dir for p in src.input_files)
    assert load_source(gguf_file).input_files == [gguf_file]


def _hf_targets(d: Path, tmp: Path) -> list[Path]:
    shard = sorted(d.glob("*.safetensors"))[1]
    sym = tmp / "sym.edgelm"
    sym.symlink_to(shard)
    hard = tmp / "hard.edgelm"
    os.link(d / "tokenizer.json", hard)
    symdir = tmp / "alias"
    symdir.symlink_to(d, target_is_directory=True)
    return [shard, d / "tokenizer.json", d / "config.json", d / "model.safetensors.index.json",
            d / "generation_config.json", sym, hard, symdir / "tokenizer_config.json"]


def test_convert_refuses_to_overwrite_a_checkpoint_file(hf_dir, tmp_path):
    before = digest(hf_dir)
    for target in _hf_targets(hf_dir, tmp_path):
        with pytest.raises(BadInputError) as ei:
            convert(load_source(hf_dir), target, scheme="fp32", progress=False)  # the library refuses too
        assert str(ei.value).startswith(f"{target}: the output is the source's input file"), str(ei.value)
        rc, err = run_entry("convert", hf_dir, "-o", target, "-q")
        assert rc == 2 and err.count("\n") == 1 and str(target) in err and "would destroy the source" in err, err
    assert digest(hf_dir) == before
    assert not [p for p in hf_dir.iterdir() if "edgelm-tmp" in p.name]
    ok = tmp_path / "fine.edgelm"  # a new file in the checkpoint's directory's neighbourhood is fine
    assert run_entry("convert", hf_dir, "-o", ok, "-q") == (0, "")
    assert ok.stat().st_size > 0


def test_convert_refuses_to_overwrite_the_gguf(gguf_file, tmp_path):
    before = gguf_file.read_bytes()
    sym = tmp_path / "sym.edgelm"
    sym.symlink_to(gguf_file)
    hard = tmp_path / "hard.edgelm"
    os.link(gguf_file, hard)
    for target in (gguf_file, sym, hard):
        rc, err = run_entry("convert", gguf_file, "-o", target, "-q")
        assert rc == 2 and str(target) in err and str(gguf_file) in err, err
    assert gguf_file.read_bytes() == before
    out = tmp_path / "tiny.edgelm"
    assert run_entry("convert", gguf_file, "-o", out, "-q") == (0, "")
    assert run_entry("run", "hello", "-m", out, "-n", "2", "--temperature", "0", "-q", "--max-tokens", "32")[0] == 0


def test_convert_refuses_to_overwrite_the_imatrix(gguf_file, tmp_path):
    imx = tmp_path / "m.imatrix.npz"
    np.savez(imx, **{"blk.0.attn_q.weight": np.ones(32, np.float32)})
    before = imx.read_bytes()
    rc, err = run_entry("convert", gguf_file, "-o", imx, "--imatrix", imx, "-q")
    assert rc == 2 and f"{imx}: the output is the source's input file {imx}" in err, err
    assert imx.read_bytes() == before


# ----------------------------------------------------------------------------- temp files


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _tiny_write(path: Path, produce=None) -> int:
    t = quantize(np.ones((2, 32), np.float32), "fp32")
    return write_bundle(path, {"arch": "gemma3", "config": {}}, [TensorPlan("a", t.scheme, t.shape)],
                        produce or (lambda plan: t), {"tokenizer": b"tok"})


def test_writer_names_its_temp_file_after_the_output_and_its_pid(tmp_path):
    out = tmp_path / "x.edgelm"
    seen = []

    def produce(plan):
        seen.extend(p.name for p in tmp_path.iterdir())
        return quantize(np.ones((2, 32), np.float32), "fp32")

    _tiny_write(out, produce)
    assert len(seen) == 1 and seen[0].startswith(f".x.edgelm.edgelm-tmp.{os.getpid()}."), seen
    assert [p.name for p in tmp_path.iterdir()] == ["x.edgelm"]


def test_killed_writer_leaves_a_temp_file_that_the_next_write_removes(tmp_path):
    out = tmp_path / "m.edgelm"
    script = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        from edgelm.format.bundle import TensorPlan, write_bundle
        from edgelm.quant.schemes import quantize
        t = quantize(np.ones((64, 256), np.float32), "fp32")
        plans = [TensorPlan(f"t{{i}}", t.scheme, t.shape) for i in range(4)]
        def produce(plan):
            if plan.name == "t2":
                os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write, as by the OOM killer or kill -9
            return t
        write_bundle({str(out)!r}, {{"arch": "gemma3", "config": {{}}}}, plans, produce)
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    left = [q for q in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".m.edgelm.edgelm-tmp.") and left[0].stat().st_size > 0, left
    # a live writer's temp file (of another process) and another output's are left alone
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".m.edgelm.edgelm-tmp.{sleeper.pid}.0123abcd"
        live.write_bytes(b"in progress")
        other = tmp_path / f".n.edgelm.edgelm-tmp.{_dead_pid()}.0123abcd"
        other.write_bytes(b"another output's")
        stale2 = tmp_path / f".m.edgelm.edgelm-tmp.{_dead_pid()}.deadbeef"
        stale2.write_bytes(b"stale")
        _tiny_write(out)
        assert sorted(q.name for q in tmp_path.iterdir()) == sorted([live.name, other.name, "m.edgelm"])
    finally:
        sleeper.kill()
        sleeper.wait()
    # once that writer is gone, its file is stale too
    assert remove_stale_temps(out) == [live]
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted([other.name, "m.edgelm"])


def test_a_write_in_progress_in_this_process_keeps_its_temp_file(tmp_path, monkeypatch):
    """Two threads writing the same (relative) output: the second one's clean-up spares the
    first one's temp file, though it carries this process's pid."""
    import threading

    from edgelm.format.bundle import Bundle

    monkeypatch.chdir(tmp_path)
    t = quantize(np.ones((2, 32), np.float32), "fp32")
    started, release = threading.Event(), threading.Event()
    errors = []

    def slow(plan):
        started.set()
        release.wait(10)
        return t

    def first():
        try:
            _tiny_write(Path("same.edgelm"), slow)
        except BaseException as e:  # reported below
            errors.append(e)

    th = threading.Thread(target=first)
    th.start()
    assert started.wait(10)
    _tiny_write(Path("same.edgelm"))
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".same.edgelm.edgelm-tmp.")]) == 1
    release.set()
    th.join(10)
    assert not errors and [p.name for p in tmp_path.iterdir()] == ["same.edgelm"]
    with Bundle("same.edgelm") as b:
        assert b.blob("tokenizer") == b"tok"


def test_cli_convert_removes_stale_temp_files(gguf_file, tmp_path):
    out = tmp_path / "t.edgelm"
    stale = tmp_path / f".t.edgelm.edgelm-tmp.{_dead_pid()}.00000000"
    stale.write_bytes(b"\0" * 100_000)
    assert run_entry("convert", gguf_file, "-o", out, "-q") == (0, "")
    assert [p.name for p in tmp_path.iterdir()] == ["t.edgelm"]


# ----------------------------------------------------------------------------- write errors


def _assert_output_error(rc: int, err: str, path: Path, reason: str) -> None:
    assert rc == 5, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edgelm: error: {path}: cannot write the bundle: "), err
    assert reason in lines[0], err


def test_unwritable_directory_is_an_output_error(gguf_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "m.edgelm"  # its "directory" is a regular file
    _assert_output_error(*run_entry("convert", gguf_file, "-o", out, "-q"), out, "is not a directory")
    if sys.platform != "linux" or not os.path.isdir("/sys") or os.access("/sys", os.W_OK) and _writable("/sys"):
        pytest.skip("no unwritable /sys here")
    for out in (Path("/sys/edgelm-test.edgelm"), Path("/sys/edgelm-test-dir/m.edgelm")):
        rc, err = run_entry("convert", gguf_file, "-o", out, "-q")
        assert rc == 5 and f"edgelm: error: {out}: cannot write the bundle: " in err, err  # EACCES or EROFS
        assert not out.exists()


def _writable(d: str) -> bool:
    try:
        with open(os.path.join(d, f".edgelm-probe-{os.getpid()}"), "wb"):
            pass
    except OSError:
        return False
    os.unlink(os.path.join(d, f".edgelm-probe-{os.getpid()}"))
    return True


def test_full_disk_is_an_output_error_and_leaves_nothing(gguf_file, tmp_path, monkeypatch):
    """ENOSPC part-way through the data (simulated: the file object fails like a full disk)."""
    import edgelm.format.bundle as bundle_mod

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f, room):
            self.f, self.room = f, room

        def write(self, data):
            n = memoryview(data).nbytes
            if n > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= n
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(bundle_mod.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode), 20_000))
    out = tmp_path / "m.edgelm"
    _assert_output_error(*run_entry("convert", gguf_file, "-o", out, "-q"), out, "No space left on device")
    assert list(tmp_path.iterdir()) == []  # no output, no temp file
    with pytest.raises(OutputError, match="No space left on device"):  # the library raises it too
        convert(load_source(gguf_file), out, scheme="fp32", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_file_size_limit_is_an_output_error(gguf_file, tmp_path):
    """A real write failure: RLIMIT_FSIZE makes the kernel refuse writes past 16 KiB (EFBIG)."""
    resource = pytest.importorskip("resource")
    out = tmp_path / "m.edgelm"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    p = subprocess.run([sys.executable, "-m", "edgelm", "convert", str(gguf_file), "-o", str(out), "-q"],
                       cwd=ROOT, capture_output=True, text=True, preexec_fn=limit)
    assert p.returncode == 5, p.stderr
    assert p.stderr.strip() == f"edgelm: error: {out}: cannot write the bundle: File too large", p.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=["022", "077", "002"])
def test_bundle_permissions_follow_the_umask(tmp_path, mask):
    out = tmp_path / "m.edgelm"
    old = os.umask(mask)
    try:
        _tiny_write(out)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
