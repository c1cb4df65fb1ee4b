"""Gemma 3n's full-size towers: edgelm against transformers (CPU torch), side by side.

    python benchmarks/towers.py speed vision [--scheme fp16|int8|fp32] [-t 2] [-r 3]
    python benchmarks/towers.py speed audio  [--scheme ...] [--seconds 30]
    python benchmarks/towers.py speed vision --glue-ab    # + edgelm with its earlier numpy glue
    python benchmarks/towers.py accuracy vision|audio
    python benchmarks/towers.py macs vision          # multiply-adds of one 768 px image, by kind
    python benchmarks/towers.py gemm [-t 2]          # fp32 products at the towers' shapes: torch vs edgelm

Both towers are built by transformers with random weights (the real geometry: MobileNet-V5
300M at 768 px; the 12-layer conformer), imported through edgelm's tensor tables and run by
edgelm the way an engine runs them: numpy on the host, weight products through the cpu
backend's matmul at the scheme, the image tower's attention and depthwise convolutions
through its kernels.
`speed` alternates transformers and edgelm on the same threads and prints each pair's time
and ratio (edgelm / transformers): the host's speed drifts, so only ratios taken side by
side mean anything. `--glue-ab` adds a third run per round, edgelm with the glue it had before the fused tower
kernels (numpy GELU after the norm kernel, the masked attention kernel with every position 0,
numpy SiLU/GLU gates), and prints edgelm now / edgelm before.
`accuracy` compares each scheme's features with edgelm's fp32 path (which
equals transformers' within 2e-6; tests/test_gemma3n_*_tower.py prove that part).

Needs the test extras (torch, transformers) and timm (test.sh installs it without
torchvision; tests/timm_support.py stands in for the one torchvision class timm imports).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def build(which: str, threads: int, redraw: bool):
    """(transformers module, edgelm tower module, config, raw stored weights, inputs, reference fn)."""
    import torch

    from timm_support import need_timm

    torch.set_num_threads(threads)
    need_timm()
    from edgelm.models import _gemma3n_audio as au
    from edgelm.models import _mobilenetv5 as mv

    g = torch.Generator().manual_seed(0)
    if which == "vision":
        from transformers import AutoModel, Gemma3nVisionConfig

        m = AutoModel.from_config(Gemma3nVisionConfig()).eval()
        mod, cfg = mv, mv.VisionConfig.from_hf({})
        x = np.random.default_rng(0).uniform(-1, 1, (3, 768, 768)).astype(np.float32)
        args = (x,)

        def ref():
            with torch.no_grad():
                return m(pixel_values=torch.from_numpy(x)[None], do_pooling=False).last_hidden_state
    else:
        from transformers import Gemma3nAudioConfig
        from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder

        m = Gemma3nAudioEncoder(Gemma3nAudioConfig()).eval()
        mod, cfg = au, au.AudioConfig.from_hf({})
        frames = int(args_seconds[0] * 100)
        x = np.random.default_rng(0).standard_normal((frames, 128)).astype(np.float32)
        args = (x, None)

        def ref():
            with torch.no_grad():
                return m(torch.from_numpy(x)[None], torch.zeros(1, frames, dtype=torch.bool))
    if redraw:  # transformers' init leaves layer scales at 1e-5: redraw the 1-D scales so every block counts
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.ndim == 1:
                    lo, span = (0.05, 0.2) if "layer_scale" in name else (0.5, 0.5)
                    p.copy_(torch.rand(p.shape, generator=g) * span + lo)
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    raw = {name: mod.import_tensor(cfg, name, sd[t.hf]) for name, t in mod.tensor_table(cfg).items()}
    return mod, cfg, raw, args, ref


args_seconds = [30.0]


def _earlier_glue(ops, which, kw):
    """The tower kernels as they were before the fused ones: the norm kernel then numpy GELU,
    the masked attention kernel with every position 0, numpy SiLU/GLU gates."""
    kw = dict(kw)
    if which == "vision":
        from edgelm.backends.base import full_attention_by_positions
        from edgelm.models._mobilenetv5 import _CHUNK, _gelu

        def rmsnorm(x, wt, eps, act=None):
            y = ops.to_host(ops.rmsnorm(x, wt, eps))
            if act:
                rows = max(1, _CHUNK // y.shape[-1])
                tmp = np.empty((min(rows, y.shape[0]), y.shape[-1]), np.float32)
                for r0 in range(0, y.shape[0], rows):
                    blk = y[r0:r0 + rows]
                    _gelu(blk, tmp[:blk.shape[0]])
            return y

        def attend(q, k, v):
            return ops.to_host(full_attention_by_positions(ops, q, k, v, 1.0))
        kw.update(rmsnorm=rmsnorm, attend=attend)
    else:
        kw["sigmoid_mul"] = kw["rmsnorm"] = None
    return kw


def edgelm_runner(which, mod, cfg, raw, args, scheme: str, threads: int, earlier_glue: bool = False):
    from edgelm.backends import get_backend
    from edgelm.models.gemma3n import tower_kernels
    from edgelm.quant.schemes import quantize

    ops = get_backend("cpu", threads)
    table = mod.tensor_table(cfg)
    w = {n: (quantize(a, scheme) if table[n].kind == "linear" else a) for n, a in raw.items()}
    kw = tower_kernels(ops, which)
    if earlier_glue:
        kw = _earlier_glue(ops, which, kw)

    def run():
        out = mod.encode(cfg, w, *args, **kw)
        return out[0] if isinstance(out, tuple) else out
    return run


def speed(a) -> None:
    mod, cfg, raw, args, ref = build(a.which, a.threads, redraw=False)
    ours = edgelm_runner(a.which, mod, cfg, raw, args, a.scheme, a.threads)
    before = edgelm_runner(a.which, mod, cfg, raw, args, a.scheme, a.threads, earlier_glue=True) if a.glue_ab else None
    ours(), ref()  # warm-up
    if before:
        before()
    ratios, glue = [], []
    for r in range(a.repeat):
        t0 = time.perf_counter()
        ref()
        t1 = time.perf_counter()
        ours()
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
        line = (f"{a.which} {a.scheme} threads={a.threads} run {r + 1}: transformers {t1 - t0:.2f} s, "
                f"edgelm {t2 - t1:.2f} s, edgelm/transformers {ratios[-1]:.2f}")
        if before:
            before()
            t3 = time.perf_counter()
            glue.append((t2 - t1) / (t3 - t2))
            line += f"; earlier glue {t3 - t2:.2f} s, edgelm/earlier {glue[-1]:.2f}"
        print(line, flush=True)
    what = "768 px image" if a.which == "vision" else f"{args_seconds[0]:g} s of audio"
    print(f"median edgelm/transformers over {a.repeat} side-by-side runs ({what}): {statistics.median(ratios):.2f}")
    if before:
        print(f"median edgelm/edgelm-with-earlier-glue: {statistics.median(glue):.2f}")


def accuracy(a) -> None:
    mod, cfg, raw, args, _ = build(a.which, a.threads, redraw=True)
    base = edgelm_runner(a.which, mod, cfg, raw, args, "fp32", a.threads)()
    for scheme in ("fp32", "fp16", "int8"):
        out = edgelm_runner(a.which, mod, cfg, raw, args, scheme, a.threads)()
        mx = np.abs(out - base).max() / np.abs(base).max()
        rms = np.sqrt(((out - base) ** 2).mean() / (base ** 2).mean())
        cos = ((out * base).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(base, axis=1)).min()
        print(f"{a.which} {scheme}: max rel {mx:.2e}, rms rel {rms:.2e}, min row cosine {cos:.5f}", flush=True)


def macs(a) -> None:
    """Run the image tower with kernels that only count: weight products, attention, depthwise."""
    if a.which != "vision":
        raise SystemExit("macs: counts the image tower only (python benchmarks/towers.py macs vision)")
    from edgelm.models import _mobilenetv5 as mv

    cfg = mv.VisionConfig.from_hf({})
    w = {n: np.full(t.shape, 0.01, np.float32) for n, t in mv.tensor_table(cfg).items()}
    c = {"weight products": 0, "attention": 0, "depthwise": 0}

    def linear(x, t):
        c["weight products"] += x.shape[0] * t.shape[0] * t.shape[1]
        return np.zeros((x.shape[0], t.shape[0]), np.float32)

    def attend(q, k, v):
        c["attention"] += 2 * q.shape[0] * q.shape[1] * k.shape[0] * q.shape[2]
        return np.zeros((q.shape[0], q.shape[1] * q.shape[2]), np.float32)

    def dwconv(x, t, s, top, left, hw):
        c["depthwise"] += hw[0] * hw[1] * x.shape[2] * t.shape[0] * t.shape[1]
        return np.zeros((hw[0], hw[1], x.shape[2]), np.float32)

    mv.encode(cfg, w, np.zeros((3, 768, 768), np.float32), linear=linear, attend=attend, dwconv=dwconv,
              rmsnorm=lambda x, wt, eps, act=None: x)
    print(", ".join(f"{k} {v / 1e9:.1f}" for k, v in c.items()) + f"; total {sum(c.values()) / 1e9:.1f} GMAC")


def gemm(a) -> None:
    """fp32 products at the towers' shapes (n x rows x cols), torch.matmul (oneDNN) and edgelm's
    matmul alternating on the same threads, best of 3 per turn, 3 turns."""
    import torch

    from edgelm.backends import get_backend
    from edgelm.quant.schemes import quantize

    torch.set_num_threads(a.threads)
    ops = get_backend("cpu", a.threads)
    r = np.random.default_rng(0)
    for n, rows, cols in ((750, 6144, 1536), (750, 1536, 6144), (2304, 1024, 256), (9216, 512, 128),
                          (2304, 2560, 640)):
        w = r.standard_normal((rows, cols)).astype(np.float32) * 0.05
        x = r.standard_normal((n, cols)).astype(np.float32)
        qt, tw, tx = quantize(w, "fp32"), torch.from_numpy(w), torch.from_numpy(x)
        best = {"torch": [], "edgelm": []}
        for _ in range(3):
            for name, fn in (("torch", lambda: tx @ tw.T), ("edgelm", lambda: ops.matmul(x, qt))):
                ts = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                best[name].append(min(ts))
        g = {k: n * rows * cols / statistics.median(v) / 1e9 for k, v in best.items()}
        print(f"{n}x{rows}x{cols} fp32, {a.threads} threads: torch {g['torch']:.1f}, edgelm {g['edgelm']:.1f} GMAC/s",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["speed", "accuracy", "macs", "gemm"])
    p.add_argument("which", nargs="?", default="vision", choices=["vision", "audio"])
    p.add_argument("--scheme", default="fp16", choices=["fp32", "fp16", "int8"])
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("-r", "--repeat", type=int, default=3)
    p.add_argument("--seconds", type=float, default=None, help="audio length (speed: 30, accuracy: 10)")
    p.add_argument("--glue-ab", action="store_true", help="speed: also time edgelm with its earlier numpy glue")
    a = p.parse_args()
    args_seconds[0] = a.seconds or (30.0 if a.mode == "speed" else 10.0)
    {"speed": speed, "accuracy": accuracy, "macs": macs, "gemm": gemm}[a.mode](a)


if __name__ == "__main__":
    main()
