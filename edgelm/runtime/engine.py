"""Engine: owns the weights (mmapped bundle), tokenizer and backend. Heavy, shared.
Sessions (KV state) are created from it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

from ..backends import get_backend
from ..errors import BadInputError, CapacityError, FormatError
from ..format.bundle import Bundle
from ..models import get_model, load_config
from ..tokenizer import Tokenizer
from .sampler import SamplerConfig
from .session import Session

DEFAULT_MAX_TOKENS = 4096
DEFAULT_PREFILL_CHUNK = 128  # as fast as 256 or 512 here, with a quarter of 512's activations
KV_DTYPES = {"f16": "float16", "f32": "float32"}
ATTN_PRECISIONS = ("auto", "f32", "bf16")
# Weight schemes whose bundles take bf16 prefill attention by default ("auto"): their own
# quantization error dwarfs its cost (docs/kernels.md, "bf16 prefill attention").
BF16_ATTN_SCHEMES = ("int4-b32", "int4-b128")


def check_text(text: str) -> None:
    """Text must be valid Unicode: a lone surrogate (possible in a Python str, or from a JSON
    escape such as \\ud800) has no UTF-8 form, so it is a BadInputError naming its position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadInputError(
            f"text has a lone surrogate U+{ord(text[e.start]):04X} at position {e.start}, which is not valid Unicode"
        ) from None


def _check_ids(ids, vocab: int) -> list[int]:
    try:
        ids = list(ids)
    except TypeError:
        raise BadInputError(f"token ids must be a sequence of integers, got {type(ids).__name__}") from None
    out = []
    for pos, i in enumerate(ids):
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise BadInputError(f"token id at position {pos} is not an integer: {i!r}")
        if not 0 <= int(i) < vocab:
            raise BadInputError(f"token id {int(i)} at position {pos} is outside the vocabulary (0..{vocab - 1})")
        out.append(int(i))
    return out


SPECIAL_IDS = ("bos", "eos", "unk", "pad", "start_of_turn", "end_of_turn")


def check_meta(bundle, vocab_size: int) -> None:
    """What the engine reads from the header besides the config: a tokenizer, special token
    ids inside the vocabulary, and a valid default sampler."""
    h = bundle.header
    where = bundle.path

    def fail(msg: str):
        raise FormatError(f"{where}: {msg}")

    if "tokenizer" not in h:
        fail("header field 'tokenizer' is missing")

    def check_id(name: str, v) -> None:
        if isinstance(v, bool) or not isinstance(v, int):
            fail(f"special token {name!r} must be a token id, got {v!r:.80}")
        if not 0 <= v < vocab_size:
            fail(f"special token {name!r} is {v}, outside the vocabulary (0..{vocab_size - 1})")

    special = h.get("special_tokens", {})
    for name in SPECIAL_IDS:
        if special.get(name) is not None:
            check_id(name, special[name])
    if "stop" in special:
        stop = special["stop"]
        if not isinstance(stop, list):
            fail(f"special token list 'stop' must be a list of token ids, got {stop!r:.80}")
        for v in stop:
            check_id("stop", v)
    if "add_bos" in special and not isinstance(special["add_bos"], bool):
        fail(f"special token field 'add_bos' must be true or false, got {special['add_bos']!r:.80}")
    sampler = h.get("sampler") or {}
    try:
        SamplerConfig.coerce({k: v for k, v in sampler.items() if k in ("temperature", "top_k", "top_p")})
    except BadInputError as e:
        fail(f"header field 'sampler': {e}")


class Engine:
    """Load a bundle and run it.

    path: a .edgelm bundle; None means the default model (prepared on first use).
    backend: "cpu" (native kernels), "numpy" (the reference), "cuda" (an NVIDIA GPU, the
        edgelm[cuda] extra), "auto" (cuda where a GPU is present, else cpu), or a
        backends.base.Backend instance (a backend defined outside edgelm).
    threads: worker threads for the native kernels (default: physical cores).
    max_tokens: KV-cache capacity per session, chosen here (e.g. 1280 or 4096). Default: 4096,
        or the model's context where that is shorter.
    prefill_chunk: prompt tokens per forward. Default: the backend's preference (512 on cuda),
        else 128.
    kv_dtype: "f16" or "f32" storage for the KV cache. Default: f16 on the native cpu and cuda
        backends (half the cache's memory and bandwidth; the kernel widens each key block to
        fp32, so the arithmetic stays fp32), f32 on the numpy reference.
    deterministic: batch-invariant kernels (cpu backend): a token's logits are then the same
        bits whether its prompt was prefilled whole or in chunks, reused from the cache, or
        decoded step by step, so a greedy or seeded request always gives the same text.
        Default: the EDGELM_DETERMINISTIC environment variable ("1" on), else off. Costs
        decode speed (docs/kernels.md, "Batch invariance").
    attn_precision: "auto" (default), "f32" or "bf16": "bf16" computes the dot products of
        prefill attention (prompt chunks of 16+ tokens) in bf16 with fp32 sums, where the CPU
        has AVX512_BF16 (e.g. AMD Zen 4, Intel Sapphire Rapids); elsewhere, and in
        deterministic mode, attention stays f32. "auto" is bf16 for int4 bundles (whose own
        quantization error is ~50x its cost) and f32 for the others. `engine.attn_precision`
        says which is in effect. Faster prompts for a small quality cost (docs/kernels.md,
        "bf16 prefill attention").
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        backend="cpu",
        threads: int | None = None,
        max_tokens: int | None = None,
        prefill_chunk: int | None = None,
        kv_dtype: str | None = None,
        deterministic: bool | None = None,
        attn_precision: str | None = None,
    ):
        if path is None:
            from .defaults import ensure_default_model

            path = ensure_default_model()
        t0 = time.perf_counter()  # init = loading; the one-time default-model preparation is not counted
        for name, val in (("max_tokens", max_tokens), ("prefill_chunk", prefill_chunk)):
            if val is None:
                continue
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise BadInputError(f"{name} must be a positive integer, got {val!r}")
        self.path = Path(path)
        self.bundle = Bundle(self.path)
        self.model = get_model(self.bundle.arch)
        self.config = load_config(self.model, self.bundle)  # config and tensor table checked
        check_meta(self.bundle, self.config.vocab_size)
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.config.max_position_embeddings)
        if max_tokens > self.config.max_position_embeddings:
            raise BadInputError(
                f"max_tokens {max_tokens} exceeds the model's context of {self.config.max_position_embeddings}")
        self.max_tokens = max_tokens
        if kv_dtype is not None and kv_dtype not in KV_DTYPES:
            raise BadInputError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        if deterministic is None:
            env = os.environ.get("EDGELM_DETERMINISTIC", "").strip().lower()
            if env not in ("", "0", "1", "false", "true", "off", "on"):
                raise BadInputError(f"EDGELM_DETERMINISTIC must be 0 or 1, got {env!r}")
            deterministic = env in ("1", "true", "on")
        elif not isinstance(deterministic, bool):
            raise BadInputError(f"deterministic must be true or false, got {deterministic!r}")
        if attn_precision is not None and attn_precision not in ATTN_PRECISIONS:
            raise BadInputError(f"attn_precision must be one of {', '.join(ATTN_PRECISIONS)}, got {attn_precision!r}")
        self.ops = get_backend(backend, threads, deterministic=deterministic or None)
        if attn_precision in (None, "auto"):
            scheme = (self.bundle.header.get("quantization") or {}).get("scheme")
            attn_precision = "bf16" if scheme in BF16_ATTN_SCHEMES else "f32"
        self.attn_precision = "bf16" if self.ops.set_attn_precision(attn_precision) else "f32"
        if prefill_chunk is None:  # the backend's preference (a GPU takes long chunks), else 128
            prefill_chunk = self.ops.prefill_chunk or DEFAULT_PREFILL_CHUNK
        self.prefill_chunk = min(prefill_chunk, max_tokens)
        self.deterministic = bool(self.ops.deterministic)
        self.backend = self.ops.name
        self.kv_dtype_name = kv_dtype or self.ops.default_kv_dtype
        self.kv_dtype = KV_DTYPES[self.kv_dtype_name]
        self.weights = self.ops.place_weights(self.model.load_weights(self.config, self.bundle))
        meta = self.bundle.header
        tok = meta.get("tokenizer", {})
        self.special = meta.get("special_tokens", {})
        blob = tok.get("blob", "tokenizer")
        try:  # the blob is a view of the mapped file; the tokenizer keeps it, copying nothing
            self.tokenizer = Tokenizer.from_blob(tok.get("kind"), self.bundle.blob_view(blob), self.special)
        except FormatError as e:
            msg = str(e)
            raise FormatError(msg if msg.startswith(str(self.path)) else f"{self.path}: tokenizer blob {blob!r}: {msg}") from None
        self.add_bos = bool(meta.get("add_bos", True))
        self.chat_template = meta.get("chat_template")
        self.stop_ids = frozenset(int(i) for i in self.special.get("stop", [])) or frozenset({self.tokenizer.eos_id})
        sampler = meta.get("sampler") or {}
        self.default_sampler = SamplerConfig.coerce({k: v for k, v in sampler.items() if k in ("temperature", "top_k", "top_p")})
        self.lock = threading.RLock()  # the native thread pool serves one forward at a time
        self.init_seconds = time.perf_counter() - t0
        self._built = True

    def __setattr__(self, name, value):
        # Sessions on other threads share the engine: once built it is read-only (an op table
        # that observes, a template cache, ... live beside it, never patched onto it).
        if self.__dict__.get("_built"):
            raise AttributeError(f"an Engine cannot be changed once built (tried to set {name!r}); make a new "
                                 f"Engine, or give a session its own op table")
        object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ text

    def tokenize(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; `parse_special=False` reads special-token literals as text."""
        if not isinstance(text, str):
            raise BadInputError(f"text must be a string, got {type(text).__name__}")
        check_text(text)
        return self.tokenizer.encode(
            text, add_bos=self.add_bos if add_bos is None else add_bos, parse_special=parse_special
        )

    def detokenize(self, ids) -> str:
        """The text of token ids; an id outside the vocabulary is a BadInputError naming it."""
        try:
            ids = list(ids)
        except TypeError:
            raise BadInputError(f"token ids must be a sequence of integers, got {type(ids).__name__}") from None
        return self.tokenizer.decode(_check_ids(ids, int(self.tokenizer.vocab_size)))

    # ------------------------------------------------------------------ sessions

    def create_session(self, sampler: SamplerConfig | dict | None = None) -> Session:
        cfg = self.default_sampler if sampler is None else SamplerConfig.coerce(sampler)
        return Session(self, cfg)

    def create_conversation(self, system: str | None = None, sampler: SamplerConfig | dict | None = None,
                            max_new_tokens: int = 512, overflow: str = "error", tools=None,
                            tool_choice: str = "auto"):
        """A multi-turn chat (see edgelm.runtime.conversation.Conversation)."""
        from .conversation import Conversation

        return Conversation(self, system=system, sampler=sampler, max_new_tokens=max_new_tokens, overflow=overflow,
                            tools=tools, tool_choice=tool_choice)

    def score(self, token_ids, start: int = 0) -> np.ndarray:
        """Teacher-forced logits (float32) for a token sequence: [n_tokens - start, vocab],
        for positions start.. (the output head is skipped for earlier positions)."""
        ids = self.check_ids(token_ids)
        if len(ids) > self.max_tokens:
            raise CapacityError(f"{len(ids)} tokens exceed the KV-cache capacity of {self.max_tokens} (raise max_tokens)")
        if not isinstance(start, int) or not 0 <= start < max(len(ids), 1):
            raise BadInputError(f"start must be in [0, {len(ids)}), got {start!r}")
        return self._score(ids, start, self.create_session())

    def _score(self, ids: list[int], start: int, s: Session) -> np.ndarray:
        outs = []
        for c in range(0, len(ids), self.prefill_chunk):
            part = ids[c:c + self.prefill_chunk]
            mode = "none" if c + len(part) <= start else max(start - c, 0)
            out = s._forward(part, mode)
            if out is not None:
                outs.append(out)
        return np.concatenate(outs, axis=0)

    def embeddings(self, inputs, pooling: str = "mean", normalize: bool = True) -> np.ndarray:
        """One vector per input (a string or a list of token ids): the model's final-norm hidden
        states over the input's tokens (BOS included where the model adds one), pooled by
        "mean" (the average over positions) or "last" (the last position, which has read the
        whole input), and scaled to unit length unless normalize=False. Returns float32
        [len(inputs), hidden]. A causal model's hidden states, not a trained embedding model:
        good for similarity and clustering, not tuned for retrieval."""
        if pooling not in ("mean", "last"):
            raise BadInputError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise BadInputError("inputs must be a non-empty list of strings or token-id lists")
        out = np.empty((len(inputs), self.config.hidden_size), np.float32)
        for i, item in enumerate(inputs):
            ids = self.tokenize(item, add_bos=self.add_bos) if isinstance(item, str) else self.check_ids(item)
            if not ids:
                raise BadInputError(f"input {i} is empty")
            if len(ids) > self.max_tokens:
                raise CapacityError(f"input {i} has {len(ids)} tokens, more than the KV-cache capacity of "
                                    f"{self.max_tokens} (raise max_tokens)")
            s = self.create_session()
            acc = np.zeros(self.config.hidden_size, np.float64)
            last = None
            for c in range(0, len(ids), self.prefill_chunk):
                h = s._forward(ids[c:c + self.prefill_chunk], "hidden")
                acc += h.sum(axis=0, dtype=np.float64)
                last = h[-1]
            v = (acc / len(ids)) if pooling == "mean" else last.astype(np.float64)
            if normalize:
                norm = float(np.linalg.norm(v))
                v = v / norm if norm > 0 else v
            out[i] = v
        return out

    def decode_batch(self, sessions, tokens) -> np.ndarray:
        """One decode step for several sessions of this engine at once: feeds tokens[b] to
        sessions[b] and returns the logits [B, vocab]. Where the model has a batched forward
        (Gemma 3) each weight is read once for all B sequences, which is what makes serving
        many users cheaper than serving them one by one; otherwise the sessions step in turn.
        With deterministic=True each row equals the session's own decode_step bit for bit."""
        sessions = list(sessions)
        if not sessions or len(sessions) != len(tokens):
            raise BadInputError("decode_batch needs one token per session, and at least one session")
        if len({id(s) for s in sessions}) != len(sessions):
            raise BadInputError("decode_batch: a session appears twice")
        ids = self.check_ids([int(t) for t in tokens] if all(isinstance(t, (int, np.integer)) for t in tokens)
                             else tokens)
        for s in sessions:
            if s.engine is not self:
                raise BadInputError("decode_batch: every session must belong to this engine")
            s._check_fits(1, "decoding")
        fb = getattr(self.model, "forward_batch", None)
        if fb is None or len(sessions) == 1:
            return np.stack([s.decode_step(t) for s, t in zip(sessions, ids)])
        n0 = [len(s.tokens) for s in sessions]
        try:
            with self.lock:
                out = fb(self.config, self.weights, self.ops, ids, n0, [s.caches for s in sessions])
        except BaseException:
            for s, n in zip(sessions, n0):
                for c in s.caches:
                    c.truncate(n)
            raise
        for s, t in zip(sessions, ids):
            s.tokens.append(t)
            s.prefilled_tokens += 1
        return self.ops.to_host(out)

    def check_ids(self, token_ids) -> list[int]:
        """Token ids as a list of ints; a non-integer or an id outside the model's vocabulary is
        a BadInputError naming it and its position."""
        return _check_ids(token_ids, self.config.vocab_size)

    def weight_bytes(self) -> int:
        return sum(self.bundle.tensor(n).nbytes for n in self.bundle.tensor_names())

    def close(self) -> None:
        self.bundle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
