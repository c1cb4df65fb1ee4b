"""Constrained decoding: outputs that follow a JSON Schema, any JSON object, a regular
expression or a Lark grammar, through llguidance (docs/structured-output.md).

A `Vocabulary` is a tokenizer as llguidance sees it (every token's bytes, special tokens
marked), built once per engine (~1 s for Gemma's 262k tokens) and kept beside it. A
`Constraint` is a grammar checked against that vocabulary; it holds no generation state, so
one serves any number of generations and sessions. Each generation runs its own matcher
(`ConstraintRun`): before a token is sampled, the tokens the grammar forbids get -inf; the
sampled token then advances the matcher, and the next mask is computed on a worker thread
while the model's forward for that token runs (both release the GIL)."""

from __future__ import annotations

import json
import re
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import llguidance as llg
import numpy as np

from ..errors import BadInputError, EdgelmError

KINDS = ("json_schema", "json_object", "regex", "lark")

# JSON with fixed separators and no free whitespace: with flexible whitespace a small model
# can pad with newlines until max_new_tokens. A schema's "x-guidance" key overrides these.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Errors without parser-state dumps: they reach users as one line.
_LIMITS = llg.LLParserLimits(verbose_errors=False)

_MAX_ERROR = 300  # characters of an llguidance message kept (a special-token error lists all 6k)


class Vocabulary:
    """A tokenizer's tokens as llguidance reads them: the bytes each token adds to the text
    (`▁` as a space, a byte-fallback piece `<0xNN>` as that byte), special tokens as
    0xFF + their name (never text; a Lark grammar names them, `<end_of_turn>`), and the stop
    ids as the end-of-sequence tokens a finished grammar allows."""

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer = tokenizer
        self.n = int(tokenizer.vocab_size)
        special = tokenizer.special_ids
        tokens = tokenizer.vocab_bytes()
        for i in special:
            if 0 <= i < self.n:
                tokens[i] = b"\xff" + tokenizer.id_to_piece(i).encode("utf-8")
        self.stop_ids = sorted(int(i) for i in stop_ids if 0 <= int(i) < self.n)
        if not self.stop_ids:
            raise BadInputError("constrained decoding needs a stop token inside the tokenizer's vocabulary")
        # The unknown token's text is not the text it stands for: it never satisfies a grammar.
        self.never = [i for i in (tokenizer.unk_id,) if i is not None and 0 <= i < self.n]
        self._byte_ids = {}
        for b in range(256):
            i = tokenizer.token_to_id(f"<0x{b:02X}>")
            if i is not None:
                self._byte_ids[b] = i
        wrapper = _Wrapper(tokens, self._encode, self.stop_ids[0], tokenizer.bos_id, sorted(special))
        ll_wrapper = llg.TokenizerWrapper(wrapper)
        self.ll = llg.LLTokenizer(ll_wrapper, n_vocab=self.n, eos_token=self.stop_ids)
        # llguidance copied the tokens into its trie and keeps the wrappers only to tokenize
        # text; the list (15 MiB for Gemma's vocabulary) is not read again.
        wrapper.tokens = ll_wrapper.tokens = ()
        self.words = (self.n + 31) // 32

    def can_spell(self, text: str) -> bool:
        """Whether the vocabulary writes `text` exactly (no unknown token, no lost character)."""
        ids = self.tokenizer.encode(text, parse_special=False)
        return not set(ids) & set(self.never) and self.tokenizer.decode(ids) == text

    def _encode(self, data: bytes) -> list[int]:
        """Token ids of bytes, for llguidance's own tokenizing (forced text, healing): control
        literals are text; bytes that are not UTF-8 become byte-fallback pieces."""
        try:
            return self.tokenizer.encode(data.decode("utf-8"), parse_special=False)
        except UnicodeDecodeError as e:
            head = self.tokenizer.encode(data[:e.start].decode("utf-8"), parse_special=False)
            unk = self.tokenizer.unk_id if self.tokenizer.unk_id is not None else 0
            return head + [self._byte_ids.get(b, unk) for b in data[e.start:]]


class _Wrapper:
    """What llguidance.TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tokens, encode, eos, bos, special):
        self.tokens = tokens
        self.eos_token_id = eos
        self.bos_token_id = bos
        self.special_token_ids = special
        self._encode = encode

    def __call__(self, data: bytes) -> list[int]:
        return self._encode(data)


# Engine -> Vocabulary. Beside the engine, not on it: an Engine is read-only once built.
_vocabularies: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_vocab_lock = threading.Lock()


def vocabulary(engine) -> Vocabulary:
    """The engine's Vocabulary, built on first use and cached for the engine's life."""
    with _vocab_lock:
        v = _vocabularies.get(engine)
        if v is None:
            v = _vocabularies[engine] = Vocabulary(engine.tokenizer, engine.stop_ids)
        return v


def _one_line(msg: str, kind: str = "lark") -> str:
    """llguidance's message without its source excerpts and caret lines, on one line. A
    regex is compiled inside a one-line Lark grammar, whose positions mean nothing to users."""
    if kind == "regex":
        msg = re.sub(r"^at \d+\(\d+\): ", "", msg).replace(" (in regex)", "")
    else:  # "at 2(4)": the line, and the column of the rule (not of the error) in it
        msg = re.sub(r"^at (\d+)\(\d+\): ", r"line \1: ", msg)
    keep = []
    for line in msg.splitlines():
        s = line.strip()
        if not s or set(s) <= set("^~ ") or re.match(r"\d+ \| ", s):
            continue
        keep.append(s)
    out = " ".join(keep)
    return out if len(out) <= _MAX_ERROR else out[:_MAX_ERROR] + "..."


class Constraint:
    """A grammar for one model's vocabulary. Give `target` (an Engine, or a Vocabulary) and
    exactly one of:

    json_schema: a JSON Schema (a dict, a bool, or its JSON text); the output is a JSON
        document that validates against it;
    json_object: True: the output is any JSON object;
    regex: the output fully matches this regular expression (Rust `regex` syntax);
    lark: a Lark grammar (llguidance's dialect: regex terminals, special tokens by name).

    An invalid or unsupported grammar, or one the vocabulary cannot start, is a BadInputError
    naming the field."""

    def __init__(self, target, *, json_schema=None, json_object: bool = False, regex: str | None = None,
                 lark: str | None = None):
        given = {k: v for k, v in (("json_schema", json_schema), ("regex", regex), ("lark", lark)) if v is not None}
        if json_object is not False:
            if json_object is not True:
                raise BadInputError(f"json_object must be true or false, got {json_object!r}")
            given["json_object"] = True
        if len(given) != 1:
            raise BadInputError(f"a constraint takes exactly one of {', '.join(KINDS)}; got "
                                f"{', '.join(given) or 'none'}")
        (self.kind, source), = given.items()
        self.timings: MaskTimings | None = None  # set one to time this constraint's runs
        self.vocab = target if isinstance(target, Vocabulary) else vocabulary(target)
        self.grammar = _compile(self.kind, source)
        m = llg.LLMatcher(self.vocab.ll, self.grammar, log_level=0, limits=_LIMITS)
        if m.is_error():
            raise BadInputError(f"{self.kind}: {_one_line(m.get_error(), self.kind)}")
        self._matcher = m
        try:  # the first mask: a grammar no token can start fails here, not mid-generation
            ConstraintRun(self)
        except BadInputError as e:
            raise BadInputError(f"{self.kind}: {e}") from None

    @classmethod
    def coerce(cls, value, engine) -> "Constraint":
        """A Constraint for `engine`, or one made from a dict such as {"json_schema": {...}}."""
        if isinstance(value, Constraint):
            if value.vocab.tokenizer is not engine.tokenizer:
                raise BadInputError("this constraint was built for another engine; build it with this one")
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(KINDS)
            if unknown:
                raise BadInputError(f"unknown constraint fields {sorted(unknown)}; use one of {', '.join(KINDS)}")
            return cls(engine, **value)
        raise BadInputError(f"constraint must be a Constraint or a dict, got {type(value).__name__}")

    def __repr__(self) -> str:
        return f"Constraint(kind={self.kind!r})"


def _compile(kind: str, source) -> str:
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
    if kind == "json_schema":
        if isinstance(source, str):
            try:
                source = json.loads(source)
            except json.JSONDecodeError as e:
                raise BadInputError(f"json_schema is not valid JSON: {e}") from None
        if source is False:
            raise BadInputError("json_schema: the schema false matches nothing")
        if source is True:  # any JSON value
            source = {}
        if not isinstance(source, dict):
            raise BadInputError(f"json_schema must be an object (or true/false), got {type(source).__name__}")
        try:
            return llg.LLMatcher.grammar_from_json_schema(source, defaults=JSON_DEFAULTS)
        except (ValueError, TypeError) as e:  # a value JSON cannot hold (a set, NaN, ...)
            raise BadInputError(f"json_schema: {e}") from None
    if not isinstance(source, str):
        raise BadInputError(f"{kind} must be a string, got {type(source).__name__}")
    return llg.LLMatcher.grammar_from_regex(source) if kind == "regex" else llg.LLMatcher.grammar_from_lark(source)


class MaskTimings:
    """Opt-in timings of the runs of one Constraint (`constraint.timings = MaskTimings()`;
    `edgelm bench --json-schema` uses it): seconds and counts summed over every run started
    after it is set. Two perf_counter() calls per timed stretch, ~0.1 us, against a decode
    step of milliseconds. Meant for one generation at a time: concurrent runs of the same
    constraint may lose counts.

    compute: the masks llguidance computed (the first of each run on the calling thread,
        the rest on the worker thread, beside the model's forward);
    wait: how long sampling waited for a mask still being computed (the part of `compute`
        the forward did not hide), over the tokens that asked for one;
    apply: ConstraintRun.apply, over the same tokens; `masked` of them set the forbidden
        logits to -inf (the rest took the greedy shortcut);
    advance: feeding each sampled token to the matcher (consume_token; it also schedules
        the next mask)."""

    def __init__(self):
        self.compute_s = self.wait_s = self.apply_s = self.advance_s = 0.0
        self.computes = self.applies = self.masked = self.advances = 0

    def to_dict(self) -> dict:
        def mean_ms(total, count):
            return 1e3 * total / count if count else None

        return {"mask_compute_ms": mean_ms(self.compute_s, self.computes), "masks": self.computes,
                "mask_wait_ms": mean_ms(self.wait_s, self.applies),
                "mask_apply_ms": mean_ms(self.apply_s, self.applies), "tokens": self.applies,
                "masked_tokens": self.masked, "advance_ms": mean_ms(self.advance_s, self.advances)}


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="edgelm-mask")
        return _executor


class ConstraintRun:
    """One generation's matcher. apply(logits) -> logits with forbidden tokens at -inf;
    advance(token) consumes the sampled token and starts the next mask in the background;
    it returns True once the grammar is complete (no token but a stop token could follow)."""

    def __init__(self, constraint: Constraint):
        self.vocab = constraint.vocab
        self.m = constraint._matcher.deep_copy()
        self.bits = np.zeros(self.vocab.words, dtype=np.uint32)
        self._pending = None
        self._out = None
        self.consumed = 0
        self._t = constraint.timings
        if self._t is not None:  # the timed variants, chosen once: an untimed run pays nothing
            self._fill, self._wait = self._fill_timed, self._wait_timed
            self.apply, self.advance = self._apply_timed, self._advance_timed
        self._fill()
        self._check()

    def _fill(self) -> None:
        self.m.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)

    def _fill_timed(self) -> None:
        t = time.perf_counter()
        ConstraintRun._fill(self)
        self._t.compute_s += time.perf_counter() - t
        self._t.computes += 1

    def _wait_timed(self) -> None:
        if self._pending is not None:
            t = time.perf_counter()
            self._pending.result()
            self._t.wait_s += time.perf_counter() - t
        ConstraintRun._wait(self)

    def _apply_timed(self, logits: np.ndarray, sampler=None) -> np.ndarray:
        t = time.perf_counter()
        w = self._t.wait_s
        out = ConstraintRun.apply(self, logits, sampler)
        self._t.apply_s += time.perf_counter() - t - (self._t.wait_s - w)  # the wait is counted apart
        self._t.applies += 1
        self._t.masked += out is not logits
        return out

    def _advance_timed(self, token: int) -> bool:
        t = time.perf_counter()
        done = ConstraintRun.advance(self, token)
        self._t.advance_s += time.perf_counter() - t
        self._t.advances += 1
        return done

    def _check(self) -> None:
        if self.m.is_error():
            err = _one_line(self.m.get_error().replace("<non-verbose/>", ""))
            if err.startswith("NoExtension"):  # llguidance's stop reason: no byte can follow
                raise BadInputError("the grammar matches no text" if not self.consumed else
                                    f"the grammar has no continuation after {self.consumed} tokens")
            raise BadInputError(f"the grammar cannot continue after {self.consumed} tokens: {err}")
        for i in self.vocab.never:
            self.bits[i >> 5] &= np.uint32(~(1 << (i & 31)) & 0xFFFFFFFF)
        if not self.bits.any():
            raise BadInputError(f"no token of this model's vocabulary can continue the grammar after "
                                f"{self.consumed} tokens (it needs text the vocabulary cannot spell)")

    def allowed(self) -> np.ndarray:
        """The current mask as booleans over the vocabulary."""
        self._wait()
        # Little-endian words: bit k of word w is token 32w + k, which is byte order on every
        # host edgelm builds for.
        return np.unpackbits(self.bits.view(np.uint8), count=self.vocab.n, bitorder="little").view(bool)

    def _wait(self) -> None:
        if self._pending is not None:
            fut, self._pending = self._pending, None
            fut.result()
            self._check()

    def apply(self, logits: np.ndarray, sampler=None) -> np.ndarray:
        """`logits` [vocab or more] with every forbidden token (and every row past the
        tokenizer's vocabulary) at -inf, in a buffer reused from step to step. With a greedy
        `sampler` (no penalties) whose pick is allowed, `logits` as they are: masking costs
        0.05-0.15 ms for 262k tokens and would not change the argmax."""
        self._wait()
        n = self.vocab.n
        if sampler is not None and sampler.greedy and not sampler.has_penalties:
            i = int(np.argmax(logits[:n]))
            if (int(self.bits[i >> 5]) >> (i & 31)) & 1:
                return logits
        ok = self.allowed()
        out = self._out
        if out is None or out.shape != logits.shape or out.dtype != logits.dtype:
            out = self._out = np.empty_like(logits)
        # A masked copy is fast where few positions are selected (~0.02 ms over 262k) and
        # slow where most are (~0.16 ms): copy the fewer of the allowed and the forbidden.
        if 2 * np.count_nonzero(ok) > n:  # mostly allowed, e.g. inside a JSON string
            np.copyto(out, logits)
            out[n:] = -np.inf
            np.copyto(out[:n], -np.inf, where=~ok)
        else:
            out.fill(-np.inf)
            np.copyto(out[:n], logits[:n], where=ok)
        return out

    def advance(self, token: int) -> bool:
        self._wait()
        if not self.m.consume_token(int(token)):
            raise EdgelmError(f"the sampled token {token} does not satisfy the grammar: "
                              f"{_one_line(self.m.get_error())}")
        self.consumed += 1
        if self.m.is_stopped():
            return True
        self._pending = _pool().submit(self._fill)
        return False

    @property
    def accepting(self) -> bool:
        """Whether the text so far is a complete match (the grammar could end here)."""
        self._wait()
        return self.m.is_accepting()


class Triggered:
    """A constraint that starts once the output contains `trigger` (llama.cpp's lazy
    grammars): tokens are free until then, and the text after the trigger must follow
    `constraint`. Tool calling uses it: a reply may be prose, but a call, once begun, is a
    well-formed call to a declared tool."""

    def __init__(self, trigger: str, constraint: Constraint):
        if not isinstance(trigger, str) or not trigger:
            raise BadInputError("a trigger must be a non-empty string")
        if not isinstance(constraint, Constraint):
            raise BadInputError(f"constraint must be a Constraint, got {type(constraint).__name__}")
        self.trigger = trigger.encode("utf-8")
        self.constraint = constraint
        self.vocab = constraint.vocab

    def __repr__(self) -> str:
        return f"Triggered({self.trigger.decode()!r}, {self.constraint!r})"


class TriggeredRun:
    """One generation under a Triggered constraint; the interface of ConstraintRun. The token
    that completes the trigger may carry text past it: that text is fed to the new matcher
    as tokens. Where it breaks the grammar the run stays free (`broken`), and the caller's
    parser sees malformed text."""

    def __init__(self, t: Triggered):
        self.t = t
        self.tail = b""  # the output's last bytes, enough to find the trigger across tokens
        self.run: ConstraintRun | None = None
        self.broken = False

    @property
    def active(self) -> bool:
        return self.run is not None

    def apply(self, logits: np.ndarray, sampler=None) -> np.ndarray:
        return logits if self.run is None else self.run.apply(logits, sampler)

    def advance(self, token: int) -> bool:
        if self.run is not None:
            return self.run.advance(token)
        if self.broken:
            return False
        trig = self.t.trigger
        tok = self.t.vocab.tokenizer
        if int(token) in tok.special_ids:
            self.tail = b""
            return False
        self.tail += tok.token_bytes(int(token))
        k = self.tail.find(trig)
        if k < 0:
            self.tail = self.tail[-(len(trig) - 1):] if len(trig) > 1 else b""
            return False
        rest = self.tail[k + len(trig):]
        self.run = ConstraintRun(self.t.constraint)
        try:
            for i in (self.t.vocab._encode(rest) if rest else ()):
                if self.run.advance(i):
                    return True
        except EdgelmError:  # the text past the trigger already breaks the grammar
            self.run, self.broken = None, True
        return False


def start_run(constraint, engine):
    """The per-generation run of a Constraint, a Triggered, or a dict naming one."""
    if isinstance(constraint, Triggered):
        if constraint.vocab.tokenizer is not engine.tokenizer:
            raise BadInputError("this constraint was built for another engine; build it with this one")
        return TriggeredRun(constraint)
    return ConstraintRun(Constraint.coerce(constraint, engine))
