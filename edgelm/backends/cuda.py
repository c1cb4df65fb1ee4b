"""The CUDA op table: the same bundles on an NVIDIA GPU, through torch tensors and the Triton
kernels of backends/cuda_kernels.py (the `edgelm[cuda]` extra; the CPU install never imports
this module).

Arrays are fp32 torch tensors on the device. Weights are uploaded once, in their stored
layout (int4 nibbles and fp16 scales, int8, fp16, fp32), and dequantized in registers by
the product kernels. Tensors a model declares host-gathered (Gemma 3n's per-layer embedding
table, `Weights.HOST_GATHERED`) stay in the mmap: only the rows a step needs are uploaded.

Decode runs as one CUDA graph per session (`decode_step`): the step's token and position
live in device buffers, the cache writes its slot and its filled length on the device, and
attention reads the filled slots only, so one captured step replays at every position. The
greedy token is taken on the device (`argmax`), so greedy decoding copies one integer per
token to the host, not the logits.

Without a GPU, TRITON_INTERPRET=1 runs every kernel in Triton's interpreter on CPU tensors:
that is how the test suite proves this backend (docs/cuda.md).
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np

from ..errors import BadInputError, CapacityError
from ..quant.schemes import QTensor
from .base import Backend, full_attention_by_positions, norm_act
from .kvcache import SlotPositions


def unavailable_reason() -> str | None:
    """None when the cuda backend can run here, else one line saying why not."""
    try:
        import torch
        import triton  # noqa: F401
    except Exception as e:
        return (f"the cuda backend needs the edgelm[cuda] extra (torch and triton; {type(e).__name__}: {e}); "
                f"install it with: pip install 'edgelm[cuda]'")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if not torch.cuda.is_available():
        return ("no CUDA GPU is visible (torch.cuda.is_available() is False"
                + ("; this torch is a CPU build" if torch.version.cuda is None else "") + "); use --backend cpu")
    return None


def gpu_present() -> bool:
    """A cheap check for `--backend auto`: an NVIDIA driver is loaded and the extra imports."""
    if not os.path.exists("/proc/driver/nvidia/version"):
        return False
    return unavailable_reason() is None


@dataclasses.dataclass(eq=False)
class DeviceWeight:
    """A QTensor's parts on the device: q (the values: fp32/fp16 weights, int8, or packed
    int4) and s (the scales; q again for the float schemes)."""

    scheme_id: int
    block: int
    rows: int
    cols: int
    shape: tuple
    q: object
    s: object
    src: object = None  # the host QTensor (the mmap views) it was uploaded from

    @property
    def nbytes(self) -> int:
        return int(self.q.numel() * self.q.element_size() + (0 if self.s is self.q else self.s.numel() * self.s.element_size()))


def _oom(what: str, nbytes: int, e: Exception):
    return CapacityError(f"CUDA out of memory {what}: {nbytes / 2**20:.1f} MiB requested ({str(e).splitlines()[0]}); "
                         f"the engine stays usable: ask for less (a smaller --max-tokens, fewer sessions)")


class _Static:
    """The device buffers of a static-shape decode step: its token and position."""

    def __init__(self, torch, device):
        self.tok = torch.zeros(1, dtype=torch.int32, device=device)
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)


class DevicePositions:
    """What a device cache hands attention in a static step: every slot's position and the
    filled length, both on the device (models pass it through untouched)."""

    __slots__ = ("pos", "length")

    def __init__(self, pos, length):
        self.pos, self.length = pos, length


class DeviceKVCache(SlotPositions):
    """The KV cache on the device, with the interface of backends/kvcache.KVCache. The slot
    positions live twice: on the device (attention's mask) and on the host (truncate,
    can_truncate), kept equal by every method."""

    def __init__(self, ops, spec, dtype):
        import torch

        self.ops = ops
        self.slots, self.window = spec.slots, spec.window
        tdt = {"float16": torch.float16, "float32": torch.float32}[np.dtype(dtype).name]
        nbytes = 2 * spec.slots * spec.kv_heads * spec.head_dim * torch.empty((), dtype=tdt).element_size()
        try:
            self.k = torch.zeros((spec.slots, spec.kv_heads, spec.head_dim), dtype=tdt, device=ops.device)
            self.v = torch.zeros_like(self.k)
        except torch.cuda.OutOfMemoryError as e:
            raise _oom("allocating a KV cache", nbytes, e) from None
        self.dpos = torch.full((spec.slots,), -1, dtype=torch.int64, device=ops.device)
        self.dlen = torch.zeros(1, dtype=torch.int32, device=ops.device)
        self.pos = np.full(spec.slots, -1, dtype=np.int64)
        self.filled = 0
        self.graph = None  # the session's captured decode step (backends.cuda._DecodeGraph)

    def _note(self, positions: np.ndarray) -> None:
        idx = positions % self.slots
        self.pos[idx] = positions
        self.filled = max(self.filled, int(idx.max()) + 1)

    def update(self, k, v, positions):
        ops = self.ops
        positions = np.asarray(positions, np.int64)
        if ops._static is not None:  # a static step: the slot comes from the device position
            ops.K.kv_write(k, v, self.k, self.v, ops._static.pos, self.dpos, self.dlen)
            self._note(positions)
            return self.k, self.v, DevicePositions(self.dpos, self.dlen)
        if positions.shape[0] > self.slots:  # only the newest `slots` entries can be kept
            k, v, dp = k[-self.slots:], v[-self.slots:], ops._upload_i64(positions[-self.slots:])
            positions = positions[-self.slots:]
        else:
            dp = ops._positions(positions)  # the forward's upload, shared with RoPE
        ops.K.kv_write(k, v, self.k, self.v, dp, self.dpos, self.dlen)
        self._note(positions)
        f = self.filled
        return self.k[:f], self.v[:f], self.dpos[:f]

    def truncate(self, n_tokens: int) -> None:
        self._forget(n_tokens)
        self.dpos.masked_fill_(self.dpos >= n_tokens, -1)
        self.dlen.fill_(self.filled)

    def copy(self) -> "DeviceKVCache":
        c = DeviceKVCache.__new__(DeviceKVCache)
        c.ops, c.slots, c.window, c.filled, c.graph = self.ops, self.slots, self.window, self.filled, None
        c.k, c.v, c.dpos, c.dlen = self.k.clone(), self.v.clone(), self.dpos.clone(), self.dlen.clone()
        c.pos = self.pos.copy()
        return c

    @property
    def nbytes(self) -> int:
        return int(self.k.numel() * self.k.element_size() * 2)

    @property
    def resident_nbytes(self) -> int:  # device memory is allocated whole
        return self.nbytes


class _DecodeGraph:
    """One session's decode step captured as a CUDA graph: static token/position buffers in,
    logits and the greedy token out."""

    def __init__(self, ops, model, cfg, weights, caches):
        self.ops, self.model, self.cfg, self.weights, self.caches = ops, model, cfg, weights, caches
        self.static = _Static(ops.torch, ops.device)
        self.graph = None
        self.logits = None
        self.steps = 0

    def _run(self, token: int, pos: int):
        return self.model.forward(self.cfg, self.weights, self.ops, np.array([token], np.int32), pos, self.caches, "last")

    def step(self, token: int, pos: int):
        torch = self.ops.torch
        self.static.tok.fill_(token)
        self.static.pos.fill_(pos)
        if self.graph is None and (self.steps == 0 or not self.ops.use_graphs):
            # the first step runs eagerly in static mode: it compiles the kernels and fills the caches
            # of placed constants, so that nothing uploads from the host while the graph is captured
            self.ops._static = self.static
            try:
                out = self._run(token, pos)
            finally:
                self.ops._static = None
            self.steps += 1
            return out
        if self.graph is None:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            self.ops._static = self.static
            try:
                with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
                    self.logits = self._run(token, pos)
            finally:
                self.ops._static = None
            torch.cuda.current_stream().wait_stream(s)
            self.graph = g
        self.graph.replay()
        p = np.array([pos], np.int64)
        for c in self.caches:  # the device side advanced inside the graph; the host mirror here
            c._note(p)
        self.steps += 1
        return self.logits


class CudaOps(Backend):
    name = "cuda"
    default_kv_dtype = "f16"
    device_logits = True  # logits may stay on the device: see argmax
    # long prompt chunks: each chunk costs ~12 launches a layer from Python, and a GPU tile
    # fills only with hundreds of rows
    prefill_chunk = 512

    def __init__(self, device: str | None = None, graphs: bool | None = None):
        why = unavailable_reason()
        if why:
            raise BadInputError(why)
        import torch

        from . import cuda_kernels as K

        self.torch, self.K = torch, K
        self.interpret = K.INTERPRET
        self.device = torch.device(device or ("cpu" if self.interpret else "cuda"))
        if graphs is None:
            graphs = os.environ.get("EDGELM_CUDA_GRAPHS", "1") != "0"
        # graphs need a real device; under the interpreter the static step runs eagerly
        self.use_graphs = bool(graphs) and self.device.type == "cuda"
        self.isa = "triton-interpreter" if self.interpret else torch.cuda.get_device_name(self.device)
        self._static: _Static | None = None
        self._uploaded: dict[int, tuple] = {}  # id(host object) -> (object, device copy)
        self._pos_cache: tuple | None = None
        self._inv: dict = {}

    # ----------------------------------------------------------------- placement
    def _upload(self, a: np.ndarray):
        torch = self.torch
        with warnings.catch_warnings():  # mmap views are read-only; the device copy is ours
            warnings.simplefilter("ignore")
            t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(self.device) if self.device.type != "cpu" else t.clone()

    def _weight(self, t):
        if isinstance(t, DeviceWeight):
            return t
        hit = self._uploaded.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        if not isinstance(t, QTensor):
            raise TypeError(f"expected a weight, got {type(t).__name__}")
        s = t.scheme
        try:
            if s.name in ("fp32", "fp16"):
                q = self._upload(t.parts["w"].reshape(t.rows, t.cols))
                dw = DeviceWeight(s.id, 0, t.rows, t.cols, tuple(t.shape), q, q, t)
            else:
                dw = DeviceWeight(s.id, s.block, t.rows, t.cols, tuple(t.shape), self._upload(t.parts["q"]),
                                  self._upload(t.parts["scale"]), t)
        except self.torch.cuda.OutOfMemoryError as e:
            raise _oom(f"uploading a {s.name} weight {tuple(t.shape)}", t.nbytes, e) from None
        self._uploaded[id(t)] = (t, dw)
        return dw

    def _vec(self, a):
        """A host fp32 array (a norm vector) on the device, uploaded once."""
        if isinstance(a, self.torch.Tensor):
            return a
        hit = self._uploaded.get(id(a))
        if hit is not None and hit[0] is a:
            return hit[1]
        d = self._upload(np.asarray(a, np.float32))
        self._uploaded[id(a)] = (a, d)
        return d

    def place_weights(self, weights):
        keep = frozenset(getattr(type(weights), "HOST_GATHERED", ()))

        def place(x, name=None):
            if name in keep:
                return x
            if isinstance(x, QTensor):
                return self._weight(x) if len(x.shape) > 1 else x
            if isinstance(x, np.ndarray):
                return self._vec(x)
            if isinstance(x, tuple):
                return tuple(place(v) for v in x)
            if dataclasses.is_dataclass(x) and not isinstance(x, type):
                return dataclasses.replace(x, **{f.name: place(getattr(x, f.name), f.name)
                                                 for f in dataclasses.fields(x)})
            return x

        return place(weights)

    def alloc_cache(self, spec, dtype):
        return DeviceKVCache(self, spec, dtype)

    def to_host(self, x) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x
        return np.ascontiguousarray(x.detach().to("cpu").numpy(), dtype=np.float32)

    # ----------------------------------------------------------------- host metadata
    def _dev(self, x):
        """A backend array (fp32 tensor); host arrays (what a tower step may pass) are uploaded."""
        torch = self.torch
        if isinstance(x, torch.Tensor):
            return x if x.dtype == torch.float32 else x.float()
        return self._upload(np.asarray(x, np.float32))

    def _upload_i64(self, a: np.ndarray):
        return self._upload(np.asarray(a, np.int64))

    def _positions(self, positions):
        """The positions of this step on the device: the static buffer in a static step, else
        an upload shared by every layer of a forward (they all pass the same array)."""
        if self._static is not None:
            return self._static.pos
        if isinstance(positions, self.torch.Tensor):
            return positions
        positions = np.asarray(positions, np.int64)
        hit = self._pos_cache
        if hit is not None and hit[0].shape == positions.shape and np.array_equal(hit[0], positions):
            return hit[1]
        d = self._upload_i64(positions)
        self._pos_cache = (positions.copy(), d)
        return d

    def _inv_freq(self, hd: int, theta: float, scale: float):
        key = (hd, float(theta), float(scale))
        d = self._inv.get(key)
        if d is None:
            d = self._inv[key] = self._upload(self.K.rope_inv_freq(hd, theta, scale))
        return d

    # ----------------------------------------------------------------- products
    def _mm(self, x, t, t2=None):
        x = self._dev(x)
        w = self._weight(t)
        lead = tuple(x.shape[:-1])
        x2 = x.reshape(-1, x.shape[-1])
        out = self.K.qmatmul(x2, w, None if t2 is None else self._weight(t2))
        return out.reshape(*lead, w.rows)

    def matmul(self, x, t):
        return self._mm(x, t)

    def matmul_multi(self, x, ts):
        x = self._dev(x)
        return [self._mm(x, t) for t in ts]

    def matmul_gelu_mul(self, x, gate, up):
        g, u = self._weight(gate), self._weight(up)
        if (g.scheme_id, g.block, g.rows, g.cols) != (u.scheme_id, u.block, u.rows, u.cols):
            return self.gelu_mul(self._mm(x, g), self._mm(x, u))  # two schemes: two products
        return self._mm(x, g, u)  # one kernel, two accumulators, GeGLU in its epilogue

    def embed(self, ids, t):
        if isinstance(t, QTensor) and id(t) not in self._uploaded:
            # a host-gathered table: dequantize the rows on the host and upload only them
            return self._dev(t.dequantize_rows(np.asarray(ids)).astype(np.float32, copy=False))
        if self._static is not None:
            d = self._static.tok
        else:
            d = self._upload(np.ascontiguousarray(ids, dtype=np.int32).reshape(-1))
        return self.K.embed(d, self._weight(t))

    def argmax(self, logits, n: int | None = None) -> int:
        """The index of the largest of logits[:n] (the first on ties), reduced on the device:
        one integer reaches the host."""
        x = self._dev(logits).reshape(-1)
        return int(self.torch.argmax(x[:n] if n else x).item())

    def topk(self, logits, k: int, n: int | None = None):
        """The k largest of logits[:n] as host arrays (values float64, ids int64), in id order:
        one copy of 2k numbers (ids below 2^24 travel exactly as floats)."""
        torch = self.torch
        x = self._dev(logits).reshape(-1)
        x = x[:n] if n else x
        v, i = torch.topk(x, min(int(k), x.shape[0]))
        order = torch.argsort(i)
        both = torch.stack([v[order], i[order].to(torch.float32)]).to("cpu").numpy()
        return both[0].astype(np.float64), both[1].astype(np.int64)

    # ----------------------------------------------------------------- norms and RoPE
    def rmsnorm(self, x, w, eps, act=None):
        gelu = norm_act(act) == 1
        y = self.K.rmsnorm(self._dev(x), self._vec(w), eps)
        return self.torch.nn.functional.gelu(y, approximate="tanh") if gelu else y

    def add_rmsnorm(self, x, h, w_post, eps, w_next=None):
        return self.K.add_rmsnorm(self._dev(x), self._dev(h), self._vec(w_post), eps,
                                  None if w_next is None else self._vec(w_next))

    def rmsnorm_rope(self, x, w, eps, positions, theta, scale=1.0):
        x = self._dev(x)
        return self.K.rope(x, self._positions(positions), self._inv_freq(x.shape[-1], theta, scale), self._vec(w), eps)

    def rope(self, x, positions, theta, scale=1.0):
        x = self._dev(x)
        return self.K.rope(x, self._positions(positions), self._inv_freq(x.shape[-1], theta, scale))

    def gelu_mul(self, g, u):
        return self.K.gelu_mul(self._dev(g), self._dev(u))

    # ----------------------------------------------------------------- attention
    def attention(self, q, k, v, q_pos, k_pos, window, scale, softcap=None):
        torch = self.torch
        q = self._dev(q)
        if not isinstance(k, torch.Tensor):
            k, v = self._dev(k), self._dev(v)
        kv_len = None
        if isinstance(k_pos, DevicePositions):
            k_pos, kv_len = k_pos.pos, k_pos.length
        elif not isinstance(k_pos, torch.Tensor):
            k_pos = self._upload_i64(k_pos)
        qp = self._positions(q_pos) if self._static is not None else (
            q_pos if isinstance(q_pos, torch.Tensor) else self._upload_i64(q_pos))
        return self.K.attention(q, k, v, qp, k_pos, int(window or 0), float(scale), softcap, kv_len=kv_len)

    # ----------------------------------------------------------------- generic array ops
    def softcap(self, x, cap):
        x = self._dev(x)
        return self.torch.tanh(x / float(cap)) * float(cap)

    def full_attention(self, q, k, v, scale):
        return full_attention_by_positions(self, q, k, v, scale)

    def sigmoid_mul(self, x, g):
        return self._dev(x) * self.torch.sigmoid(self._dev(g))

    def tanh(self, x):
        return self.torch.tanh(self._dev(x))

    def einsum(self, spec, *xs):
        return self.torch.einsum(spec, *[self._dev(x) for x in xs])

    def concat(self, xs, axis=0):
        return self.torch.cat([self._dev(x) for x in xs], dim=axis)

    def match_rms(self, x, ref, floor=1e-5):
        torch = self.torch
        x, ref = self._dev(x), self._dev(ref)
        target = torch.sqrt(torch.mean(ref * ref, dim=-1, keepdim=True))
        have = torch.sqrt(torch.clamp(torch.mean(x * x, dim=-1, keepdim=True), min=float(floor)))
        return x * (target / have)

    def gaussian_topk(self, g, k):
        torch = self.torch
        g = self._dev(g)
        cutoff = g.mean(dim=-1, keepdim=True) + g.std(dim=-1, keepdim=True, unbiased=False) * float(k)
        return torch.clamp(g - cutoff, min=0.0)

    def splice(self, x, rows, values):
        x = self._dev(x)
        x[self._upload_i64(rows)] = self._dev(values)
        return x

    def depthwise_conv2d(self, x, taps, stride, top, left, out_hw):
        F = self.torch.nn.functional
        x, taps = self._dev(x), self._dev(taps)
        H, W, C = x.shape
        k, s = taps.shape[0], int(stride)
        oh, ow = int(out_hw[0]), int(out_hw[1])
        bottom = max(0, s * (oh - 1) + k - (H + top))
        right = max(0, s * (ow - 1) + k - (W + left))
        xin = F.pad(x.permute(2, 0, 1)[None], (left, right, top, bottom))
        out = F.conv2d(xin, taps.permute(2, 0, 1)[:, None], stride=s, groups=C)
        return out[0, :, :oh, :ow].permute(1, 2, 0).contiguous()

    # ----------------------------------------------------------------- decode graphs
    def decode_step(self, model, cfg, weights, caches, token: int, pos: int):
        """One decode step of a session (logits [vocab] on the device), through the session's
        static step: captured once as a CUDA graph and replayed (on a GPU), or run eagerly in
        static mode (the interpreter). None where the model cannot take a static step (it
        gathers rows on the host), and the caller runs the ordinary forward."""
        if getattr(type(weights), "HOST_GATHERED", ()):
            return None
        holder = caches[0]
        g = holder.graph
        if g is None or g.caches is not caches or g.weights is not weights:
            g = holder.graph = _DecodeGraph(self, model, cfg, weights, caches)
        return g.step(int(token), int(pos))
