"""One worker thread runs the generations, first come first served; requests wait in a
bounded FIFO queue. Finished sessions are kept in a small pool and reused by the request
whose prompt shares the longest prefix with them (prompt caching: a chat client that resends
its whole history each turn prefills only the new turn); past the pool, more are kept while
their KV fits a byte budget (a least-recently-used cache of prompt prefixes)."""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import weakref
from dataclasses import dataclass, field


from ..runtime.sampler import SamplerConfig
from ..runtime.session import DecodeRequest, GenerationStats, PrefillProgress, Session


@dataclass
class Job:
    ids: list[int]
    sampler: SamplerConfig
    max_new_tokens: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # (index, kind, value); shared by a request's choices
    index: int = 0  # the choice this job generates
    constraint: object = None  # a Constraint or Triggered (runtime.constrained)
    logprobs: int | None = None
    request_id: str = ""  # the response id, for the log line
    cancel: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0  # prompt tokens whose KV was reused
    spans: list = field(default_factory=list)  # (start, Embeddings): soft rows of the prompt (images, audio)
    done: bool = False
    id: int = field(default_factory=itertools.count().__next__)

    def emit(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, value))
        except RuntimeError:  # the event loop is gone (shutdown)
            pass


MAX_AUTO_PARALLEL = 8


def auto_parallel(engine, memory_fraction: float = 0.25) -> int:
    """The default number of slots for `edgelm serve`: as many full KV caches (at the engine's
    capacity) as fit in a quarter of the memory available now, at most MAX_AUTO_PARALLEL (8
    sequences already make decode compute-bound on small models) and at least 1."""
    import os

    specs = engine.model.cache_specs(engine.config, engine.max_tokens, engine.prefill_chunk)
    per_elem = 2 if engine.kv_dtype_name == "f16" else 4
    kv = sum(2 * c.slots * c.kv_heads * c.head_dim * per_elem for c in specs)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1
    return max(1, min(MAX_AUTO_PARALLEL, int(avail * memory_fraction // max(kv, 1))))


MAX_CACHED_PREFIXES = 256  # idle sessions at most, whatever the byte budget


class QueueFull(Exception):
    pass


class Scheduler:
    """FIFO queue in front of one worker thread: at most `max_queue` requests wait behind
    the one being generated (0: none wait; a request is taken only when the worker is free)."""

    def __init__(self, engine, max_queue: int = 16, pool_size: int = 2, on_done=None, parallel: int = 1,
                 prefix_cache_bytes: int = 0):
        self.engine = engine
        # Idle sessions past pool_size are kept, most recent first, while their KV takes at
        # most this many bytes: a byte-bounded LRU of prompt prefixes (0: the pool alone).
        self.prefix_cache_bytes = max(0, int(prefix_cache_bytes))
        self.parallel = max(1, int(parallel))  # sequences decoded together (continuous batching)
        self._active: list = []  # the batched worker's running slots
        self.on_done = on_done  # called (on the worker) with each finished job and its stats
        self.max_queue = max_queue
        self.pool_size = pool_size
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._idle: list[Session] = []  # most recently used last
        self._live: weakref.WeakSet[Session] = weakref.WeakSet()
        self._soft: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # session -> its prompt's soft spans
        self._running: Job | None = None
        self._stopping = False
        self.completed = 0
        self.recent: collections.deque = collections.deque(maxlen=64)  # (job id, stop reason, tokens)
        target = self._work if self.parallel == 1 else self._work_batched
        self._thread = threading.Thread(target=target, name="edgelm-generate", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ control

    def submit(self, job: "Job | list[Job]") -> int:
        """Queue a job, or a request's jobs together (all or none); returns the place in the
        queue of the last. Raises QueueFull when they would put more than max_queue behind
        the running one (a request's own jobs are let in together when the queue is empty)."""
        jobs = job if isinstance(job, list) else [job]
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            waiting = len(self._queue) + (self._running is not None and self.parallel == 1)
            if waiting > self.max_queue or (waiting and waiting + len(jobs) - 1 > self.max_queue):
                raise QueueFull(f"the server is busy: {len(self._queue)} requests are already waiting "
                                f"(the limit is {self.max_queue})")
            self._queue.extend(jobs)
            self._cv.notify()
            return len(self._queue)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            for job in self._queue:
                job.cancel.set()
            if self._running is not None:
                self._running.cancel.set()
            for slot in list(self._active):
                slot.job.cancel.set()
            self._cv.notify_all()
        self._thread.join(timeout)

    def stats(self) -> dict:
        with self._cv:
            return {
                "queued": len(self._queue),
                "running": self._running is not None or bool(self._active),
                "active": len(self._active) if self.parallel > 1 else int(self._running is not None),
                "parallel": self.parallel,
                "max_queue": self.max_queue,
                "idle_sessions": len(self._idle),
                "cached_prefix_bytes": self._idle_bytes(),
                "live_sessions": len(self._live),
                "completed": self.completed,
            }

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._queue:
                    return
                job = self._queue.popleft()
                self._running = job
            try:
                self._run(job)
            finally:
                with self._cv:
                    self._running = None
                    self.completed += 1

    def _reusable(self, s: Session, ids: list[int], spans) -> int:
        """How much of `s`'s context a prompt (ids, soft spans) can reuse: the common prefix
        of the ids, cut where the soft rows held and wanted differ (equal placeholder ids
        over different images are not the same context)."""
        from ..runtime.conversation import _first_soft_difference

        n = s.common_prefix(ids)
        held = self._soft.get(s, [])
        return _first_soft_difference(held, spans, n) if (held or spans) else n

    def _sync(self, sess: Session, ids: list[int], spans) -> tuple[list, int]:
        """Brings `sess` to the longest reusable prefix of the prompt; returns what to feed
        (ids, or content parts where soft rows remain to be fed) and how many prompt tokens
        were reused."""
        from ..runtime.conversation import _feed_parts, _first_soft_difference

        held = self._soft.get(sess, [])
        if held or spans:  # (text-only on both sides: sync's own prefix match is the whole story)
            n = sess.common_prefix(ids)
            keep = _first_soft_difference(held, spans, n)
            if keep < n and not sess.rewind(keep):
                sess.reset()
        feed = sess.sync(ids)
        self._soft[sess] = list(spans)
        cached = len(ids) - len(feed)
        return (_feed_parts(feed, cached, spans) if spans else feed), cached

    def _take_session(self, ids: list[int], spans=()) -> Session:
        best, best_n = None, -1
        for s in self._idle:
            n = self._reusable(s, ids, spans)
            if n > best_n:
                best, best_n = s, n
        room = self._idle_bytes() < self.prefix_cache_bytes  # the prefix cache may grow
        if best is not None and 0 < best_n < len(best.tokens) and room:
            # the prompt shares only a part of what `best` holds: reuse that part in a copy, so
            # that the whole cached sequence stays for whoever sends it again
            s = best.clone()
            self._soft[s] = list(self._soft.get(best, []))
            self._live.add(s)
            self._idle.remove(best)
            self._idle.append(best)  # just used: the most recent
            return s
        if best is not None and best_n <= 0 and len(self._idle) >= self.pool_size:
            # nothing shared: a new session while the cache has room, else the least recently
            # used one is reset
            best = None if room else self._idle[0]
        if best is not None and (best_n > 0 or len(self._idle) >= self.pool_size):
            self._idle.remove(best)
            return best
        s = self.engine.create_session()
        self._live.add(s)
        return s

    @staticmethod
    def _session_bytes(s: Session) -> int:
        return sum(c.resident_nbytes for c in s.caches)

    def _idle_bytes(self) -> int:
        return sum(self._session_bytes(s) for s in list(self._idle))  # a copy: stats() reads it from another thread

    def _return_session(self, s: Session) -> None:
        # a kept session whose whole sequence this one continues (the same prompt asked again,
        # a conversation's earlier turn) is subsumed by it: drop the older copy
        held, spans = s.held_tokens, self._soft.get(s, [])
        for old in list(self._idle):
            h, old_spans = old.held_tokens, self._soft.get(old, [])
            if len(h) <= len(held) and held[:len(h)] == h and old_spans == spans[:len(old_spans)]:
                self._idle.remove(old)
        self._idle.append(s)
        # the pool's sessions always stay; more stay while their KV fits the prefix budget
        while len(self._idle) > self.pool_size and (
                len(self._idle) > MAX_CACHED_PREFIXES or self._idle_bytes() > self.prefix_cache_bytes):
            self._idle.pop(0)

    def _run(self, job: Job) -> None:
        if job.cancel.is_set():  # its client left while it waited
            self.recent.append((job.id, "cancelled", 0))
            job.done = True
            job.emit("done", None)
            return
        sess = self._take_session(job.ids, job.spans)
        ok = False
        try:
            sess.set_sampler(job.sampler)
            feed, job.cached_tokens = self._sync(sess, job.ids, job.spans)
            sent = 0
            for item in sess.generate(feed, max_new_tokens=job.max_new_tokens, stop=job.stop, cancel=job.cancel,
                                      constraint=job.constraint, logprobs=job.logprobs):
                if isinstance(item, GenerationStats):
                    self.recent.append((job.id, item.stop_reason, item.generated_tokens))
                    if self.on_done is not None:
                        try:
                            self.on_done(job, item)
                        except Exception:  # accounting must never fail a request
                            pass
                    job.emit("done", item)
                else:  # the text, and the logprobs of the tokens sampled since the last piece
                    lps = sess.generated_logprobs[sent:]
                    sent += len(lps)
                    job.emit("piece", (item, lps))
            ok = True
        except Exception as e:  # reported to the client as a 500
            job.emit("error", e)
        finally:
            job.done = True
            if ok:
                self._return_session(sess)
            else:
                sess.reset()


class _Slot:
    """One running generation of the batched worker."""

    def __init__(self, job: Job, sess: Session, steps):
        self.job, self.sess, self.steps = job, sess, steps
        self.pending: int | None = None  # the token whose logits the generation waits for
        self.prefilling = False  # between two chunks of its prompt
        self.sent = 0  # logprobs already sent with pieces


def _batched(cls):
    """Adds the continuous-batching worker to Scheduler."""

    def _work_batched(self) -> None:
        while True:
            try:
                if not self._step_batched():
                    return
            except Exception as e:  # never let the worker die: fail what is running, go on
                for sl in list(self._active):
                    self._fail(sl, e)

    def _step_batched(self) -> bool:
        """Admits waiting requests into free slots, then decodes one token for every running
        one. False once stopped with nothing left."""
        with self._cv:
            while not self._queue and not self._active and not self._stopping:
                self._cv.wait()
            if self._stopping and not self._queue and not self._active:
                return False
            new = []
            while self._queue and len(self._active) + len(new) < self.parallel:
                new.append(self._queue.popleft())
        k = 0
        while k < len(new):  # prefill runs here, between decode steps
            group = [new[k]]  # the choices of one request share its prompt's prefill
            while k + len(group) < len(new) and new[k + len(group)].events is new[k].events:
                group.append(new[k + len(group)])
            k += len(group)
            self._admit_group(group)
        # one prompt chunk of each request still prefilling, between the decode steps of the
        # running ones, so that a long prompt does not stall them
        for sl in [sl for sl in self._active if sl.prefilling]:
            sl.prefilling = False
            self._pump(sl, None)
        ready = [sl for sl in self._active if sl.pending is not None]
        if not ready:
            return True
        try:
            logits = self.engine.decode_batch([sl.sess for sl in ready], [sl.pending for sl in ready])
        except Exception as e:
            for sl in ready:
                self._fail(sl, e)
            return True
        for sl, row in zip(ready, logits):
            sl.pending = None
            self._pump(sl, row)
        return True

    def _admit_group(self, jobs: list) -> None:
        """Admits the choices of one request: the prompt (all but its last token) is prefilled
        once, and each choice continues a copy of that session."""
        ids = jobs[0].ids
        if len(jobs) == 1 or len(ids) < 2 or jobs[0].spans:  # (soft rows: each choice prefills its own)
            for job in jobs:
                self._admit(job)
            return
        base = self._take_session(ids)
        try:
            feed, _ = self._sync(base, ids[:-1], [])
            cached = len(ids) - 1 - len(feed)
            base.prefill(feed)
        except Exception:
            base.reset()
            for job in jobs:
                self._admit(job)
            return
        for i, job in enumerate(jobs):
            job.cached_tokens = cached if i == 0 else len(ids) - 1
            try:
                sess = base if i == len(jobs) - 1 else base.clone()
            except Exception:  # (no memory for a copy): this choice prefills on its own
                self._admit(job)
                continue
            self._admit(job, sess)

    def _admit(self, job: Job, prepared: Session | None = None) -> None:
        if job.cancel.is_set():
            self.recent.append((job.id, "cancelled", 0))
            job.done = True
            job.emit("done", None)
            with self._cv:
                self.completed += 1
            return
        sess = self._take_session(job.ids, job.spans) if prepared is None else prepared
        try:
            sess.set_sampler(job.sampler)
            if prepared is None:
                feed, job.cached_tokens = self._sync(sess, job.ids, job.spans)
            else:  # holds all of the prompt but its last token
                feed = job.ids[-1:]
                self._live.add(sess)
            steps = sess.steps(feed, max_new_tokens=job.max_new_tokens, stop=job.stop, cancel=job.cancel,
                               constraint=job.constraint, logprobs=job.logprobs)
        except Exception as e:
            job.emit("error", e)
            job.done = True
            sess.reset()
            with self._cv:
                self.completed += 1
            return
        sl = _Slot(job, sess, steps)
        with self._cv:
            self._active.append(sl)
        self._pump(sl, None)

    def _pump(self, sl: _Slot, value) -> None:
        """Advances a slot's generation until it asks for logits or ends."""
        job = sl.job
        try:
            msg = next(sl.steps) if value is None else sl.steps.send(value)
            while True:
                if isinstance(msg, DecodeRequest):
                    sl.pending = msg.token
                    return
                if isinstance(msg, PrefillProgress):  # its next chunk comes after a decode step
                    sl.prefilling = True
                    return
                if isinstance(msg, GenerationStats):
                    self.recent.append((job.id, msg.stop_reason, msg.generated_tokens))
                    if self.on_done is not None:
                        try:
                            self.on_done(job, msg)
                        except Exception:
                            pass
                    job.emit("done", msg)
                else:
                    lps = sl.sess.generated_logprobs[sl.sent:]
                    sl.sent += len(lps)
                    job.emit("piece", (msg, lps))
                msg = next(sl.steps)
        except StopIteration:
            self._finish(sl, ok=True)
        except Exception as e:
            self._fail(sl, e)

    def _fail(self, sl: _Slot, e: Exception) -> None:
        sl.job.emit("error", e)
        self._finish(sl, ok=False)

    def _finish(self, sl: _Slot, ok: bool) -> None:
        sl.steps.close()
        sl.job.done = True
        with self._cv:
            if sl in self._active:
                self._active.remove(sl)
            self.completed += 1
        if ok:
            self._return_session(sl.sess)
        else:
            sl.sess.reset()

    for f in (_work_batched, _step_batched, _admit_group, _admit, _pump, _fail, _finish):
        setattr(cls, f.__name__, f)
    return cls


_batched(Scheduler)
