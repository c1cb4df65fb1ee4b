"""Session: owns the KV state of one sequence. Prefill runs in chunks; decode one token
at a time; generate() is a generator of text pieces followed by the final stats."""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from ..errors import BadInputError, CapacityError
from ..models._inputs import SoftRows
from .content import Part, is_parts, resolve
from .sampler import MAX_TOP_LOGPROBS, SamplerConfig, sample, token_logprobs

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    ttft_seconds: float
    stop_reason: str  # "stop_token", "stop_string", "grammar_complete", "max_new_tokens", "cancelled"

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first generated token comes from prefill's logits; decode steps make the rest.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tok_s"] = self.prefill_tok_s
        d["decode_tok_s"] = self.decode_tok_s
        return d


class StopStrings:
    """Text-level stop strings over a stream of pieces.

    feed(piece) returns the text that is safe to emit now: text that could still be the
    start of a stop string is held back until it is decided. Once a stop string appears,
    `stopped` is set and nothing from it onwards is ever emitted."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.stopped: str | None = None

    def feed(self, piece: str) -> str:
        if self.stopped is not None:
            return ""
        if not self.stops:
            return piece
        self.buf += piece
        cut = -1
        for s in self.stops:
            i = self.buf.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut, self.stopped = i, s
        if cut >= 0:
            out, self.buf = self.buf[:cut], ""
            return out
        # keep the longest suffix that is a proper prefix of some stop string
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if self.buf.endswith(s[:k]):
                    keep = k
                    break
        out = self.buf[:len(self.buf) - keep]
        self.buf = self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped is not None else self.buf), ""
        return out


def check_stop_strings(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise BadInputError("stop must be a string or a list of strings")
    if any(not s for s in stop):
        raise BadInputError("stop strings must not be empty")
    return list(stop)


@dataclass(frozen=True)
class PrefillProgress:
    """What Session.steps() yields between prefill chunks (done of total tokens fed)."""

    done: int
    total: int


@dataclass(frozen=True)
class DecodeRequest:
    """What Session.steps() yields when it needs the logits that follow `token`."""

    token: int


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token, its log-probability, and the most likely tokens with theirs."""

    token: int
    logprob: float
    top: list  # [(token id, logprob)], most likely first


# A top-k sample on a device backend copies k candidates to the host instead of the row.
DEVICE_TOP_K = 1024


class DeviceLogits:
    """A logits row left in a device backend's memory (Backend.device_logits)."""

    __slots__ = ("ops", "x")

    def __init__(self, ops, x):
        self.ops, self.x = ops, x

    def argmax(self, n: int | None) -> int:
        return self.ops.argmax(self.x, n)

    def topk(self, k: int, n: int | None):
        return self.ops.topk(self.x, k, n)

    def host(self) -> np.ndarray:
        return self.ops.to_host(self.x)


class Session:
    """One sequence's KV state. Not thread-safe, except cancel(), which any thread may call."""

    def __init__(self, engine: "Engine", sampler: SamplerConfig):
        self.engine = engine
        self.ops = engine.ops  # the op table this session's forwards run on
        self.sampler = sampler
        self._rng = None  # the sampler's generator, made on first use (see rng)
        specs = engine.model.cache_specs(engine.config, engine.max_tokens, engine.prefill_chunk)
        self.caches = [engine.ops.alloc_cache(spec, engine.kv_dtype) for spec in specs]
        self.tokens: list[int] = []  # every token whose K/V is in the cache
        self.last_stats: GenerationStats | None = None
        self.pending_token: int | None = None
        self.prefilled_tokens = 0  # tokens fed through the model over the session's life
        self.generated_ids: list[int] = []  # the ids sampled by the last generate()
        self.generated_logprobs: list[TokenLogprob] = []  # ... and their logprobs, when asked
        self._cancel = threading.Event()
        self._tok_vocab = int(getattr(engine.tokenizer, "vocab_size", 0) or 0)

    @property
    def rng(self):
        """The sampler's numpy Generator (seeded by the sampler config). Made on first use:
        importing numpy.random loads OpenSSL's libcrypto (~3 MiB resident), which greedy
        decoding never needs."""
        return self._get_rng()

    def set_sampler(self, sampler: SamplerConfig) -> None:
        """Use another sampler config from now on; its seed restarts the generator."""
        self.sampler = sampler
        self._rng = None

    def _get_rng(self):
        if self._rng is None:
            self._rng = np.random.default_rng(self.sampler.seed)
        return self._rng

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def capacity(self) -> int:
        return self.engine.max_tokens

    @property
    def held_tokens(self) -> list[int]:
        """The session's sequence: the cached tokens plus the sampled, not yet fed one."""
        return self.tokens + ([self.pending_token] if self.pending_token is not None else [])

    def reset(self) -> None:
        for c in self.caches:
            c.truncate(0)
        self.tokens = []
        self.pending_token = None

    def clone(self) -> "Session":
        """Fork: an independent session with a copy of this one's KV state, tokens, pending
        token and sampler RNG state. Both continue independently."""
        other = Session.__new__(Session)
        other.engine = self.engine
        other.ops = self.ops
        other.sampler = self.sampler
        other._rng = copy.deepcopy(self._rng)
        other.caches = [c.copy() for c in self.caches]
        other.tokens = list(self.tokens)
        other.last_stats = self.last_stats
        other.pending_token = self.pending_token
        other.prefilled_tokens = 0
        other.generated_ids = list(self.generated_ids)
        other.generated_logprobs = list(self.generated_logprobs)
        other._cancel = threading.Event()
        other._tok_vocab = self._tok_vocab
        return other

    def can_rewind(self, n_tokens: int) -> bool:
        return 0 <= n_tokens <= len(self.tokens) and all(c.can_truncate(n_tokens) for c in self.caches)

    def rewind(self, n_tokens: int) -> bool:
        """Keep only the first n_tokens cached tokens (drops the pending token). Returns False,
        changing nothing, where a sliding-window ring no longer holds what that needs; the
        caller then resets and prefills again."""
        if not self.can_rewind(n_tokens):
            return False
        for c in self.caches:
            c.truncate(n_tokens)
        del self.tokens[n_tokens:]
        self.pending_token = None
        return True

    def common_prefix(self, ids) -> int:
        """Length of the longest common prefix of held_tokens and ids."""
        held = self.held_tokens
        n = min(len(held), len(ids))
        i = 0
        while i < n and held[i] == ids[i]:
            i += 1
        return i

    def sync(self, ids) -> list[int]:
        """Prepare to continue with the full sequence `ids` (e.g. a re-rendered chat), reusing
        the KV of the longest common prefix with what the session holds. Rewinds where the
        sequence diverges (or resets where a sliding-window ring cannot rewind that far).
        Returns the tokens to give generate(): the rest of ids, at least one token."""
        ids = [int(i) for i in ids]
        if not ids:
            raise BadInputError("the prompt is empty")
        c = self.common_prefix(ids)
        if c >= len(ids):  # the whole prompt is held: re-feed its last token to get logits
            c = len(ids) - 1
        n_cached = len(self.tokens)
        if c > n_cached:  # the pending token matches; generate() feeds it first
            return ids[n_cached + 1:]
        if c < n_cached or self.pending_token is not None:
            if not self.rewind(c):
                self.reset()
                c = 0
        return ids[c:]

    def cancel(self) -> None:
        """Stop the generation in progress (from any thread) within one decode step. The
        session stays usable; the stats say stop_reason="cancelled"."""
        self._cancel.set()

    def _forward(self, ids: list[int], logits: str, embeds=None, keep: bool = False):
        """keep: on a backend that can keep logits in its memory (a GPU), return them as
        DeviceLogits, so that a greedy step copies one token id to the host, not the row."""
        eng = self.engine
        n0 = len(self.tokens)
        kw = {} if embeds is None else {"embeds": embeds}
        ops = self.ops
        try:
            with eng.lock:
                out = None
                if ops.device_logits and len(ids) == 1 and logits == "last" and embeds is None:
                    out = ops.decode_step(eng.model, eng.config, eng.weights, self.caches, ids[0], n0)
                if out is None:
                    out = eng.model.forward(eng.config, eng.weights, ops, ids, n0, self.caches, logits, **kw)
        except BaseException as e:
            for c in self.caches:  # a half-written chunk must not stay visible
                c.truncate(n0)
            if type(e).__name__ == "OutOfMemoryError":  # a device backend's (torch's) allocator
                raise CapacityError(
                    f"out of device memory running a {len(ids)}-token step ({str(e).splitlines()[0]}); the session "
                    f"is unchanged: use a smaller --prefill-chunk or --max-tokens, or fewer sessions") from None
            raise
        self.tokens.extend(ids)
        self.prefilled_tokens += len(ids)
        if out is None:
            return None
        return DeviceLogits(ops, out) if keep and ops.device_logits else ops.to_host(out)

    def _check_fits(self, n_new: int, what: str) -> None:
        if len(self.tokens) + n_new > self.capacity:
            raise CapacityError(
                f"{what} needs {len(self.tokens) + n_new} tokens of context but the KV-cache capacity is "
                f"{self.capacity} ({len(self.tokens)} already used); raise max_tokens (--max-tokens) or shorten the request")

    def prefill(self, token_ids, return_logits: bool = False) -> np.ndarray:
        """Feed tokens in chunks. Returns the last token's logits [vocab], or with
        return_logits=True every position's logits [n, vocab]."""
        ids = self.engine.check_ids(token_ids)
        if not ids:
            raise BadInputError("prefill needs at least one token")
        self._check_fits(len(ids), "the prompt")
        chunk = self.engine.prefill_chunk
        outs = []
        last = None
        for s in range(0, len(ids), chunk):
            part = ids[s:s + chunk]
            final = s + chunk >= len(ids)
            mode = "all" if return_logits else ("last" if final else "none")
            out = self._forward(part, mode)
            if return_logits:
                outs.append(out)
            elif final:
                last = out
        return np.concatenate(outs, axis=0) if return_logits else last

    def decode_step(self, token_id: int, device: bool = False) -> "np.ndarray | DeviceLogits":
        """Feed one token; returns the logits [vocab] for the next position. device=True: on a
        backend that keeps logits in its memory (cuda), return them there as DeviceLogits, which
        sample() takes (a greedy sample then copies one token id to the host)."""
        ids = self.engine.check_ids([token_id])
        self._check_fits(1, "decoding")
        return self._forward(ids, "last", keep=device)

    def sample(self, logits: "np.ndarray | DeviceLogits", generated=()) -> int:
        cfg = self.sampler
        n_vocab = self._tok_vocab
        if isinstance(logits, DeviceLogits):
            if cfg.greedy and not cfg.has_penalties:
                return logits.argmax(n_vocab or None)
            if not cfg.has_penalties and 0 < cfg.top_k <= DEVICE_TOP_K:
                # only the top-k candidates reach the host (in vocabulary order); the draw is
                # over the same distribution as from the whole row
                vals, ids = logits.topk(cfg.top_k, n_vocab or None)
                return int(ids[sample(vals, cfg.replace(top_k=0), self._get_rng)])
            logits = logits.host()
        if n_vocab and logits.shape[-1] > n_vocab:
            # embedding rows past the tokenizer's vocabulary (padding) are never sampled
            logits = logits[..., :n_vocab]
        context = ()
        if cfg.repetition_penalty != 1.0:
            n = cfg.penalty_last_n
            context = self.held_tokens[-n:] if n else self.held_tokens
        return sample(logits, cfg, self._get_rng, context, generated)

    def generate(self, prompt: "str | list[int] | list[Part]", max_new_tokens: int = 256, stop_ids=None,
                 **kw) -> Iterator["str | GenerationStats"]:
        """Yields text pieces as they decode, then one GenerationStats (see steps() for the
        arguments). Errors about the request are raised here, before any work."""
        return self._drive(self.steps(prompt, max_new_tokens, stop_ids, **kw))

    def steps(
        self,
        prompt: "str | list[int] | list[Part]",
        max_new_tokens: int = 256,
        stop_ids=None,
        *,
        stop=None,
        cancel: threading.Event | None = None,
        constraint=None,
        logprobs: int | None = None,
    ):
        """generate() as a coroutine, for a driver that batches the decode steps of several
        sessions (the server's continuous batching): it yields text pieces,
        DecodeRequest(token) when it needs the logits that follow `token` (send them back with
        .send(logits), e.g. a row of Engine.decode_batch), PrefillProgress between prefill
        chunks (resume it with next(); others may decode meanwhile), and last the
        GenerationStats. Prefill runs inside, from the first next().

        The prompt continues the session's context (a fresh session starts with BOS). It is
        text, token ids, or a list of content parts (runtime/content.py: text, soft
        embeddings; image and audio slots).
        stop: stop strings (text level; the text from a stop string on is not emitted).
        cancel: an extra Event that stops generation when set (as cancel() does).
        constraint: a runtime.constrained.Constraint (or a dict such as {"json_schema": {...}}):
        only tokens the grammar allows are sampled, and generation stops once it is complete
        (stop_reason "grammar_complete"); max_new_tokens still bounds an unfinished one. A
        constrained.Triggered constraint starts once the output contains its trigger text.
        logprobs: None, or how many of the most likely alternatives (0-20) to record beside
        each sampled token's own log-probability, in `generated_logprobs` (one
        TokenLogprob per sampled token, filled as tokens are sampled). They are the model's
        (softmax of its logits at temperature 1, before penalties, grammar masks and
        top-k/top-p)."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise BadInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        stop_strings = check_stop_strings(stop)
        eng = self.engine
        embeds = None
        if isinstance(prompt, str):
            ids = eng.tokenize(prompt, add_bos=eng.add_bos and not self.tokens)
        elif is_parts(prompt):
            ids, embeds = resolve(eng, prompt, add_bos=eng.add_bos and not self.tokens)
        else:
            ids = eng.check_ids(prompt)
        if not ids:
            raise BadInputError("the prompt is empty")
        if self.pending_token is not None:  # the previous reply's last token
            ids = [self.pending_token] + ids
            if embeds is not None:
                embeds = SoftRows(embeds.rows + 1, embeds.values)
        self._check_fits(len(ids) + max_new_tokens, f"a {len(ids)}-token prompt plus {max_new_tokens} new tokens")
        stops = eng.stop_ids if stop_ids is None else frozenset(stop_ids)
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                     or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise BadInputError(f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {logprobs!r}")
        run = None
        if constraint is not None:
            from .constrained import start_run

            run = start_run(constraint, eng)
        self._cancel.clear()
        return self._steps(ids, max_new_tokens, stops, stop_strings, cancel, embeds, run, logprobs)

    def _drive(self, steps):
        """Runs a steps coroutine on its own, one decode_step at a time."""
        try:
            msg = next(steps)
            while True:
                if isinstance(msg, DecodeRequest):
                    try:
                        logits = self.decode_step(msg.token, device=True)
                    except BaseException as e:
                        msg = steps.throw(e)
                        continue
                    msg = steps.send(logits)
                elif isinstance(msg, PrefillProgress):
                    msg = next(steps)
                else:
                    yield msg
                    msg = next(steps)
        except StopIteration:
            return
        finally:
            steps.close()

    def _prefill_cancellable(self, ids, cancel, embeds=None):
        """prefill(), checking for cancellation between chunks: returns None if cancelled
        (what was fed so far stays in the cache). A generator: it yields PrefillProgress
        between chunks, where a batching driver may run other sequences' decode steps."""
        chunk = self.engine.prefill_chunk
        out = None
        for s in range(0, len(ids), chunk):
            if s:
                yield PrefillProgress(s, len(ids))
            if s and self._cancelled(cancel):
                return None
            final = s + chunk >= len(ids)
            part = None if embeds is None else embeds.window(s, s + chunk)
            out = self._forward(ids[s:s + chunk], "last" if final else "none", part, keep=True)
            if s == 0:
                self.pending_token = None  # it was ids[0], now in the cache
        return out

    def _cancelled(self, extra) -> bool:
        return self._cancel.is_set() or (extra is not None and extra.is_set())

    def _steps(self, ids, max_new_tokens, stops, stop_strings=(), cancel=None, embeds=None, constraint=None,
               logprobs=None):
        t0 = time.perf_counter()
        generated = 0
        reason = "max_new_tokens"
        ttft = None
        t_prefill = 0.0
        t_dec = t0
        out_ids: list[int] = []
        self.generated_ids = out_ids  # filled as tokens are sampled (also when closed early)
        lps: list[TokenLogprob] = []
        self.generated_logprobs = lps
        n_vocab = self._tok_vocab
        decoder = self.engine.tokenizer.stream()
        stopper = StopStrings(stop_strings)
        if self._cancelled(cancel):
            reason = "cancelled"
        else:
            logits = yield from self._prefill_cancellable(ids, cancel, embeds)
            t_prefill = time.perf_counter() - t0
            t_dec = time.perf_counter()
            if logits is None:
                reason = "cancelled"
            while logits is not None:
                if self._cancelled(cancel):
                    reason = "cancelled"
                    break
                if isinstance(logits, DeviceLogits) and (constraint is not None or logprobs is not None):
                    logits = logits.host()
                raw = logits
                if constraint is not None:
                    logits = constraint.apply(logits, self.sampler)
                tok = self.sample(logits, out_ids)
                if logprobs is not None:
                    lp, top = token_logprobs(raw[:n_vocab] if n_vocab else raw, tok, logprobs)
                    lps.append(TokenLogprob(tok, lp, top))
                out_ids.append(tok)
                generated += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
                # The last sampled token is not in the cache; a continuing turn feeds it first.
                self.pending_token = tok
                if tok in stops:
                    reason = "stop_token"
                    break
                # advancing starts the next mask, which then runs beside the next forward
                complete = constraint is not None and constraint.advance(tok)
                piece = stopper.feed(decoder.feed(tok))
                if piece:
                    yield piece
                if stopper.stopped is not None:
                    reason = "stop_string"
                    break
                if complete:
                    reason = "grammar_complete"
                    break
                if generated >= max_new_tokens:
                    break
                if self._cancelled(cancel):
                    reason = "cancelled"
                    break
                logits = yield DecodeRequest(tok)
                self.pending_token = None
        if stopper.stopped is None:
            tail = stopper.feed(decoder.flush())
            if stopper.stopped is not None and reason != "cancelled":
                reason = "stop_string"
            tail += stopper.flush()
            if tail:
                yield tail
        t_end = time.perf_counter()
        self.last_stats = GenerationStats(
            prompt_tokens=len(ids),
            generated_tokens=generated,
            prefill_seconds=t_prefill,
            decode_seconds=t_end - t_dec,
            ttft_seconds=ttft or 0.0,
            stop_reason=reason,
        )
        yield self.last_stats
