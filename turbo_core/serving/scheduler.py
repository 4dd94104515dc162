"""Continuous (iteration-level) batching over one shared cache.

One thread runs steps. A step: drop cancelled and timed-out requests (their sequences are
released at once), admit waiting requests while the KV budget and ``max_batch`` allow, run prefill chunks of
the oldest admitted prompts (up to ``prefill_per_step`` tokens), then one forward for every
decoding sequence together. A request joins the decoding batch when its prompt is done (the prefill's last
logits give its first token) and leaves it on EOS, a stop string, ``max_tokens`` or its
deadline. Events reach the caller through the ``sink`` it passes: ``(text_delta, None)`` per
token, then ``("", finish_reason)`` once — ``stop``, ``length``, ``timeout``, ``cancelled``
or ``error: ...``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from turbo_core.serving.engine import Engine, Limits, Sampling

log = logging.getLogger(__name__)

Sink = Callable[[tuple[str, str | None]], None]


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``: try again later (HTTP 429)."""


class TooLarge(ValueError):
    """The request can never be admitted under this server's KV budget (HTTP 400)."""


@dataclass(frozen=True)
class Hooks:
    """Optional observers (the app's Prometheus metrics): batch size per decode step, time to
    first token, time between tokens, each request's finish reason."""

    batch: Callable[[int], None] = lambda n: None
    ttft: Callable[[float], None] = lambda s: None
    itl: Callable[[float], None] = lambda s: None
    finished: Callable[[str], None] = lambda reason: None


@dataclass(eq=False)
class Request:
    prompt: list[int]
    sampling: Sampling
    sink: Sink
    deadline: float
    need_bytes: int
    submitted: float = field(default_factory=time.monotonic)
    slot: int | None = None
    prefilled: int = 0
    produced: list[int] = field(default_factory=list)
    text: str = ""
    last_token_at: float | None = None
    cancelled: bool = False
    done: bool = False
    gen: torch.Generator | None = None

    def cancel(self) -> None:
        """Ask the scheduler to drop this request (a client that went away); thread-safe."""
        self.cancelled = True

    @property
    def length(self) -> int:
        return self.prefilled + max(0, len(self.produced) - 1)


class Scheduler:
    """Runs :class:`Engine` steps for every admitted request; :meth:`submit` is thread-safe."""

    def __init__(self, engine: Engine, limits: Limits, hooks: Hooks | None = None):
        self.engine, self.limits, self.hooks = engine, limits, hooks or Hooks()
        self.cache = engine.new_cache()
        self._waiting: deque[Request] = deque()
        self._prefilling: list[Request] = []
        self._decoding: list[Request] = []
        self._reserved = 0
        self._cv = threading.Condition()
        self._stop = False
        self.kv_bytes = 0  # bytes the open sequences occupy, after the last step
        self.kv_bytes_peak = 0
        self.max_running = 0
        self.last_step_ok: float | None = None
        self._thread = threading.Thread(target=self._run, name="turbo-scheduler", daemon=True)
        self._thread.start()

    # -- the caller's side -------------------------------------------------------------------
    def submit(self, prompt: list[int], sampling: Sampling, sink: Sink) -> Request:
        """Queue a request; raises :class:`TooLarge` or :class:`QueueFull` instead."""
        if not prompt:
            raise ValueError("prompt is empty")
        need = self.cache.bytes_for(len(prompt) + sampling.max_tokens)
        budget = self.limits.kv_budget
        if budget is not None and need > budget:
            raise TooLarge(f"prompt ({len(prompt)} tokens) + max_tokens ({sampling.max_tokens}) "
                           f"need {need} bytes of KV cache; the server's KV budget is {budget}")
        req = Request(prompt, sampling, sink, time.monotonic() + self.limits.request_timeout_s,
                      need, gen=sampling.generator())
        with self._cv:
            if len(self._waiting) >= self.limits.max_queue and not self._can_admit(req):
                raise QueueFull(f"server busy: {self.running} sequences running and "
                                f"{len(self._waiting)} waiting (queue bound {self.limits.max_queue})")
            self._waiting.append(req)
            self._cv.notify()
        return req

    @property
    def running(self) -> int:
        return len(self._prefilling) + len(self._decoding)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not (self._waiting or self.running):
                    self._cv.wait()
                if self._stop:
                    break
            try:
                self._step()
                self.last_step_ok = time.monotonic()
            except Exception as exc:  # a failed forward fails its requests, not the server
                log.exception("scheduler step failed")
                for req in [*self._prefilling, *self._decoding]:
                    self._finish(req, f"error: {type(exc).__name__}: {exc}")
            self._account()
        for req in [*self._waiting, *self._prefilling, *self._decoding]:
            self._finish(req, "cancelled")

    def _can_admit(self, req: Request) -> bool:
        budget = self.limits.kv_budget
        return self.running < self.limits.max_batch and \
            (budget is None or self._reserved + req.need_bytes <= budget)

    def _step(self) -> None:
        now = time.monotonic()
        with self._cv:  # submit() appends from other threads
            pending = [*self._waiting]
        for req in [*pending, *self._prefilling, *self._decoding]:
            if req.cancelled:
                self._finish(req, "cancelled")
            elif now > req.deadline:
                self._finish(req, "timeout")
        with self._cv:
            while self._waiting and self._can_admit(self._waiting[0]):
                req = self._waiting.popleft()
                req.slot = self.cache.add_sequence()
                self._reserved += req.need_bytes
                self._prefilling.append(req)
        self.max_running = max(self.max_running, self.running)
        # whole chunks on the prompt's own grid (0, c, 2c, ...): with a packed cache the chunk
        # boundaries decide what later prompt tokens see, so they must not depend on the load
        budget = self.limits.prefill_per_step
        while self._prefilling:
            req = self._prefilling[0]
            n = min(self.limits.prefill_chunk, len(req.prompt) - req.prefilled)
            if n > budget:
                break
            budget -= self._prefill(req, n)
        if self._decoding:
            self._decode(list(self._decoding))

    def _prefill(self, req: Request, tokens: int) -> int:
        """One forward of up to ``tokens`` prompt tokens; returns how many ran."""
        start = req.prefilled
        chunk = req.prompt[start: start + tokens]
        logits = self.engine.forward(self.cache, [req.slot], [chunk], [start])
        req.prefilled += len(chunk)
        if req.prefilled == len(req.prompt):
            self._prefilling.remove(req)
            self._decoding.append(req)
            self.hooks.ttft(time.monotonic() - req.submitted)
            self._emit(req, req.sampling.pick(logits[0], req.gen))
        return len(chunk)

    def _decode(self, batch: list[Request]) -> None:
        self.hooks.batch(len(batch))
        logits = self.engine.forward(self.cache, [r.slot for r in batch],
                                     [[r.produced[-1]] for r in batch], [r.length for r in batch])
        for i, req in enumerate(batch):
            self._emit(req, req.sampling.pick(logits[i], req.gen))

    def _emit(self, req: Request, token: int) -> None:
        now = time.monotonic()
        if req.last_token_at is not None:
            self.hooks.itl(now - req.last_token_at)
        req.last_token_at = now
        if token == self.engine.eos_token_id and not req.sampling.ignore_eos:
            return self._finish(req, "stop")
        req.produced.append(token)
        full = self.engine.decode(req.produced)
        delta, req.text = full[len(req.text):], full
        hit = next((s for s in req.sampling.stop if s in full), None)
        if hit is not None:
            cut = len(full) - full.index(hit)  # characters of this delta from the stop on
            req.sink((delta[: max(0, len(delta) - cut)], None))
            return self._finish(req, "stop")
        req.sink((delta, None))
        if len(req.produced) >= req.sampling.max_tokens:
            self._finish(req, "length")

    def _finish(self, req: Request, reason: str) -> None:
        if req.done:
            return
        req.done = True
        with self._cv:
            for queue in (self._waiting, self._prefilling, self._decoding):
                if req in queue:
                    queue.remove(req)
            if req.slot is not None:
                self.cache.release(req.slot)
                self._reserved -= req.need_bytes
                req.slot = None
        self.hooks.finished(reason.split(":")[0])
        req.sink(("", reason))

    def _account(self) -> None:
        self.kv_bytes = self.cache.nbytes()
        self.kv_bytes_peak = max(self.kv_bytes_peak, self.kv_bytes)

    # -- convenience for tests and tools -----------------------------------------------------
    def generate(self, prompt: list[int], sampling: Sampling) -> tuple[str, str, int]:
        """Blocking: ``(text, finish_reason, tokens)`` of one request."""
        import queue

        events: queue.Queue = queue.Queue()
        self.submit(prompt, sampling, events.put)
        parts, n = [], 0
        while True:
            delta, finish = events.get()
            parts.append(delta)
            if finish is not None:
                return "".join(parts), finish, n
            n += 1
