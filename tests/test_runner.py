"""The engine loop (engine/llm/runner.py) that the Triton llm model and the Pipeline run on: every
request gets exactly one final event whatever fails, and the loop outlives every failure (issue 10,
item 4: recovery after a step error)."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest

from engine.llm.engine import LLMEngine, TokenEvent
from engine.llm.runner import EngineRunner, StepStats
from engine.sampling_params import SamplingParams
from tests.test_llm_engine import qwen3, run_alone, setups, text_ids, tokens_of  # noqa: F401

TIMEOUT = 60


class Collector:
    """Events of one request, and a way to wait for its final one."""

    def __init__(self):
        self.events: list[TokenEvent] = []
        self.done = threading.Event()

    def __call__(self, event: TokenEvent) -> None:
        assert not self.done.is_set(), f"event after the final one: {event}"
        self.events.append(event)
        if event.finish_reason is not None:
            self.done.set()

    def wait(self) -> list[TokenEvent]:
        assert self.done.wait(TIMEOUT), f"no final event; got {self.events}"
        return self.events


@pytest.fixture
def engine(qwen3):
    return LLMEngine(qwen3.model, qwen3.cfg.stop_token_id)


@pytest.fixture
def runner(engine):
    runner = EngineRunner(engine, idle_wait=0.05)
    yield runner
    runner.close()


def test_step_error_recovery_keeps_the_request_submitted_meanwhile_whole(qwen3, engine, runner, monkeypatch):
    """The old recovery ran a full step (admission, prefill, sampling) and dropped its events: a
    request submitted during the failure lost its first token, or its only one and its FINAL."""
    rng = np.random.default_rng(41)
    ids_a, ids_b = text_ids(rng, 7), text_ids(rng, 9)
    a, b = Collector(), Collector()
    params_b = SamplingParams(max_new_tokens=1)  # its first token is its last: losing it hangs the client
    real_step = engine.step
    calls = {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 3:  # "a" is decoding; "b" arrives while this step fails
            runner.submit("b", ids_b, None, params_b, b)
            raise RuntimeError("kernel failure")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    runner.submit("a", ids_a, None, SamplingParams(max_new_tokens=50), a)
    events_a = a.wait()
    assert events_a[-1] == TokenEvent("a", None, "error", "RuntimeError: kernel failure")
    assert len(tokens_of(events_a)) == 2  # the two steps before the failure
    events_b = b.wait()
    expected = run_alone(qwen3, ids_b, params_b)
    assert [(e.request_id, e.token_id, e.finish_reason) for e in events_b] == [("b", e.token_id, e.finish_reason) for e in expected]


def test_loop_survives_a_failing_recovery_and_serves_later_requests(qwen3, engine, runner, monkeypatch):
    rng = np.random.default_rng(42)
    ids = text_ids(rng, 6)
    params = SamplingParams(max_new_tokens=4)
    real_step, real_fail = engine.step, engine.fail_running
    failures = {"steps": 0, "recovery": 1}

    def failing_step():
        failures["steps"] += 1
        if failures["steps"] in (2, 3):  # "first" is running: its recovery fails, then the next step
            raise RuntimeError("step broke")
        return real_step()

    def failing_recovery(error):
        if failures["recovery"]:
            failures["recovery"] -= 1
            raise RuntimeError("recovery broke too")
        return real_fail(error)

    monkeypatch.setattr(engine, "step", failing_step)
    monkeypatch.setattr(engine, "fail_running", failing_recovery)
    first = Collector()
    runner.submit("first", ids, None, params, first)
    assert first.wait()[-1] == TokenEvent("first", None, "error", "RuntimeError: step broke")
    assert failures["recovery"] == 0  # the failing recovery did happen, and the loop went on
    later = Collector()
    runner.submit("later", ids, None, params, later)
    assert tokens_of(later.wait()) == tokens_of(run_alone(qwen3, ids, params))
    assert later.events[-1].finish_reason == "length"


def test_a_receiver_that_raises_is_cancelled_and_the_others_go_on(qwen3, runner):
    rng = np.random.default_rng(43)
    ids_bad, ids_ok = text_ids(rng, 5), text_ids(rng, 8)
    params = SamplingParams(max_new_tokens=20)
    seen = queue.SimpleQueue()

    def broken(event):
        seen.put(event)
        raise ConnectionResetError("client went away")

    ok = Collector()
    runner.submit("bad", ids_bad, None, params, broken)
    runner.submit("ok", ids_ok, None, params, ok)
    assert tokens_of(ok.wait()) == tokens_of(run_alone(qwen3, ids_ok, params))
    events = []
    while not seen.empty():
        events.append(seen.get())
    assert events[-1].finish_reason == "abort" and len(tokens_of(events)) < 20


def test_cancelled_request_finishes_with_abort(qwen3, runner):
    cancelled = threading.Event()
    events = Collector()
    runner.submit("c", text_ids(np.random.default_rng(44), 5), None, SamplingParams(max_new_tokens=500), events, cancelled.is_set)
    cancelled.set()
    assert events.wait()[-1] == TokenEvent("c", None, "abort")


def test_cancel_client_ends_only_the_requests_sent_with_that_client_id(qwen3, runner):
    events = {name: Collector() for name in ("a1", "a2", "b")}
    for name, collector in events.items():
        ids = text_ids(np.random.default_rng(len(name)), 5)
        runner.submit(name, ids, None, SamplingParams(max_new_tokens=400), collector, client_id=name[0])
    assert runner.cancel_client("a") == 2
    assert [events[n].wait()[-1].finish_reason for n in ("a1", "a2")] == ["abort", "abort"]
    assert events["b"].wait()[-1].finish_reason == "length" and len(tokens_of(events["b"].wait())) == 400
    assert runner.cancel_client("a") == 0  # finished: nothing left to cancel


def test_bad_request_is_refused_at_submit_and_never_called_back(qwen3, runner):
    def never(event):
        raise AssertionError(f"called back: {event}")

    with pytest.raises(ValueError, match="prompt-table row"):
        runner.submit("bad", np.array([1, qwen3.vocab], np.int32), None, SamplingParams(), never)
    ok = Collector()
    runner.submit("bad", text_ids(np.random.default_rng(45), 4), None, SamplingParams(max_new_tokens=2), ok)  # id free again
    assert ok.wait()[-1].finish_reason == "length"


def test_a_failing_step_observer_loses_no_event(qwen3, engine):
    def broken_metric(step):
        raise RuntimeError("metrics backend down")

    runner = EngineRunner(engine, on_step=broken_metric, idle_wait=0.05)
    try:
        ids, params = text_ids(np.random.default_rng(46), 6), SamplingParams(max_new_tokens=5)
        events = Collector()
        runner.submit("m", ids, None, params, events)
        assert tokens_of(events.wait()) == tokens_of(run_alone(qwen3, ids, params))
    finally:
        runner.close()


def test_step_observer_sees_each_step_with_its_time_and_whether_it_prefilled(qwen3):
    """What internvl_llm_step_duration_us{phase} adds up: a chunked prompt prefills over several steps
    (the last also samples the first token), then every step decodes one token."""
    engine = LLMEngine(qwen3.model, qwen3.cfg.stop_token_id, max_num_tokens=4)
    steps: list[StepStats] = []
    runner = EngineRunner(engine, on_step=steps.append, idle_wait=0.05)
    try:
        events = Collector()
        started = time.perf_counter()
        runner.submit("t", text_ids(np.random.default_rng(47), 10), None, SamplingParams(max_new_tokens=5), events)
        events.wait()
        elapsed = time.perf_counter() - started
    finally:
        runner.close()
    assert [(s.batch_size, s.prefilled) for s in steps] == [(1, True)] * 3 + [(1, False)] * 4  # 10 tokens in chunks of 4
    assert all(s.seconds > 0 for s in steps) and sum(s.seconds for s in steps) <= elapsed


def test_close_called_on_the_loop_thread_stops_the_loop_without_an_error(engine, runner, caplog):
    """A Pipeline's finalizer closes its runner on whichever thread collects it, the loop's own too."""
    final = Collector()

    def close_on_first_token(event: TokenEvent) -> None:
        runner.close()
        final(event)

    runner.submit("a", text_ids(np.random.default_rng(43), 5), None, SamplingParams(max_new_tokens=1), close_on_first_token)
    final.wait()
    runner._thread.join(TIMEOUT)
    assert not runner._thread.is_alive()
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
