"""The engine loop: one background thread steps the LLMEngine for every request in flight and hands
each request's events to that request's callback. The Triton llm model and the in-process Pipeline
both run on it, so in-process requests batch like served ones.

Every submitted request gets exactly one final event (finish_reason set), whatever fails: a request's
own error arrives as its "error" event; if a step fails as a whole, the running requests fail and the
ones still waiting (also those submitted meanwhile) run on; a callback that raises is cancelled
without stopping the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.llm.engine import LLMEngine, TokenEvent, describe
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepStats:
    batch_size: int  # sequences the step ran
    seconds: float  # the step's wall time
    prefilled: bool  # it computed prompt tokens (else every sequence decoded one token)


@dataclass(slots=True)
class _Request:
    on_event: Callable[[TokenEvent], None]
    is_cancelled: Callable[[], bool] | None
    client_id: str | None
    queued: bool = False  # in the engine (until then, add_request is still checking / compiling it)


class EngineRunner:
    def __init__(self, engine: LLMEngine, on_step: Callable[[StepStats], None] | None = None, idle_wait: float = 0.5):
        self.engine = engine
        self._on_step = on_step  # called after each step that ran sequences
        self._idle_wait = idle_wait
        self._requests: dict[str, _Request] = {}
        self._lock = threading.Lock()  # guards _requests: submit, delivery, recovery
        self._wakeup = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        request_id: str,
        input_ids: np.ndarray,  # int32 [L]; ids ≥ vocab_size index prompt_table rows
        prompt_table: np.ndarray | None,  # float32 [P, H]
        params: SamplingParams,
        on_event: Callable[[TokenEvent], None],  # called from the loop thread
        is_cancelled: Callable[[], bool] | None = None,  # polled before each step
        client_id: str | None = None,  # the id the client knows the request by (cancel_client)
        table_keys: Sequence[tuple[str, int]] | None = None,  # (content key, rows) per image: prefix reuse (LLMEngine)
    ) -> None:
        """Raises ValueError for a bad request; nothing is queued then and on_event is never called."""
        if self._closing:
            raise RuntimeError("the engine loop is closed")
        request = _Request(on_event, is_cancelled, client_id)
        with self._lock:  # registered before it is queued: its first event must find its receiver
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._requests[request_id] = request
        try:  # outside the lock: compiling a guide takes up to seconds, and delivery waits for the lock
            self.engine.add_request(request_id, input_ids, prompt_table, params, table_keys)
        except BaseException:
            with self._lock:
                del self._requests[request_id]
            raise
        request.queued = True
        self._wakeup.set()

    def cancel(self, request_id: str) -> None:
        """The request finishes with an "abort" event at the next step (no-op once it has finished)."""
        self.engine.abort(request_id)
        self._wakeup.set()

    def cancel_client(self, client_id: str) -> int:
        """cancel() for every live request submitted with this client_id -> how many."""
        with self._lock:
            ids = [rid for rid, r in self._requests.items() if r.client_id == client_id]
        for request_id in ids:
            self.cancel(request_id)
        return len(ids)

    def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        self._wakeup.set()
        if threading.current_thread() is not self._thread:  # a finalizer may run on the loop's own thread
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._closing:
            try:
                self._turn()
            except Exception:  # noqa: BLE001 — the loop outlives anything; requests learn of it by events
                log.exception("llm engine loop")

    def _turn(self) -> None:
        if not self.engine.has_work():
            self._wakeup.wait(self._idle_wait)
            self._wakeup.clear()
            return
        self._poll_cancellations()
        started = time.perf_counter()
        try:
            events = self.engine.step()
        except Exception as error:  # noqa: BLE001 — a step failed as a whole
            log.exception("llm engine step")
            events = self._recover(describe(error))
        seconds = time.perf_counter() - started
        for event in events:
            self._deliver(event)
        if self._on_step and self.engine.last_batch_size:  # after delivery: a failing metric loses no event
            self._on_step(StepStats(self.engine.last_batch_size, seconds, self.engine.last_step_prefilled))

    def _recover(self, error: str) -> list[TokenEvent]:
        """Fails the running requests and any request the failed step had dropped, without scheduling:
        waiting ones keep their place and run at the next step."""
        with self._lock:
            events = self.engine.fail_running(error)
            answered = {e.request_id for e in events} | set(self.engine.live_ids())
            lost = [rid for rid, r in self._requests.items() if r.queued and rid not in answered]
        return events + [TokenEvent(rid, None, "error", error) for rid in lost]

    def _poll_cancellations(self) -> None:
        with self._lock:
            requests = list(self._requests.items())
        for request_id, request in requests:
            try:
                cancelled = request.is_cancelled is not None and request.is_cancelled()
            except Exception:  # noqa: BLE001 — whoever cannot tell is gone
                cancelled = True
            if cancelled:
                self.engine.abort(request_id)

    def _deliver(self, event: TokenEvent) -> None:
        with self._lock:
            request = self._requests.get(event.request_id)
            if request is not None and event.finish_reason is not None:
                del self._requests[event.request_id]
        if request is None:
            return
        try:
            request.on_event(event)
        except Exception:  # noqa: BLE001 — one receiver's failure ends only its request
            log.exception("delivering an event of request %s", event.request_id)
            self.engine.abort(event.request_id)
