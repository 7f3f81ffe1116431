"""The in-process pipeline: streaming, sampling, stop strings, bad input."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from client.synthetic import synthetic_image
from engine.pipeline import Pipeline
from engine.preprocess import ImageError
from engine.prompt import PromptError


def _image(seed: int) -> bytes:
    return synthetic_image(seed, 640, 360, "JPEG")


@pytest.fixture(scope="module")
def pipe(tiny) -> Pipeline:
    with Pipeline.from_pretrained(tiny, vision_backend="onnxruntime") as pipe:
        yield pipe


@pytest.mark.parametrize(
    "question, seeds",
    [("Describe the image.", (1,)), ("Image-1: <image>\nImage-2: <image>\nCompare.", (2, 3)), ("Tell me a story.", ())],
)
def test_stream_deltas_join_to_the_chat_reply(pipe, question, seeds):
    images = [_image(s) for s in seeds]
    reply = pipe.chat(question, images, max_new_tokens=40)
    deltas = list(pipe.stream(question, images, max_new_tokens=40))
    assert len(deltas) > 1
    assert "".join(deltas) == reply
    assert reply == reply.strip() and reply


def test_generate_reports_tokens_and_finish_reason(pipe):
    result = pipe.generate("Describe the image.", [_image(4)], max_new_tokens=9)
    assert result.finish_reason == "length" and len(result.token_ids) == 9
    assert result.text == pipe.tokenizer.decode(result.token_ids).strip()
    assert result.prompt_tokens == len(pipe.prepare("Describe the image.", [_image(4)]).prompt.input_ids)


def test_seeded_sampling_is_reproducible_and_seed_dependent(pipe):
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95, top_k=0)
    a = pipe.generate("Tell me a story.", seed=11, **kwargs).token_ids
    b = pipe.generate("Tell me a story.", seed=11, **kwargs).token_ids
    c = pipe.generate("Tell me a story.", seed=12, **kwargs).token_ids
    assert a == b
    assert a != c


def test_stop_string_cuts_the_reply_and_ends_generation(pipe):
    full = pipe.generate("Tell me a story.", max_new_tokens=30)
    words = full.text.split()
    stop = next(w for w in words[len(words) // 2 :] if len(w) >= 2)[:2]
    result = pipe.generate("Tell me a story.", max_new_tokens=30, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text == full.text[: full.text.index(stop)].strip()
    assert len(result.token_ids) < len(full.token_ids)
    assert "".join(pipe.stream("Tell me a story.", max_new_tokens=30, stop=[stop])) == result.text


def test_chat_returns_history_without_mutating_the_callers(pipe):
    history = [("Hi", "Hello")]
    reply, new_history = pipe.chat("Describe.", [], history, return_history=True, max_new_tokens=5)
    assert history == [("Hi", "Hello")]
    assert new_history == [("Hi", "Hello"), ("Describe.", reply)]


def test_closing_a_stream_early_leaves_the_engine_idle(pipe):
    stream = pipe.stream("Tell me a story.", max_new_tokens=50)
    next(stream)
    stream.close()
    deadline = time.monotonic() + 10  # the engine loop retires it at its next step
    while pipe.llm.has_work() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pipe.llm.has_work()
    assert pipe.chat("Tell me a story.", max_new_tokens=5)  # the engine still serves


@pytest.mark.parametrize(
    "image, error, message",
    [
        (b"", ImageError, "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, ImageError, "cannot decode"),
        (b"this is plain text, not an image", ImageError, "cannot decode"),
        (_image(5)[:600], ImageError, "cannot decode"),  # truncated JPEG
    ],
    ids=["empty", "corrupt-png", "not-an-image", "truncated-jpeg"],
)
def test_bad_images_raise_a_clear_error(pipe, image, error, message):
    with pytest.raises(error, match=message):
        pipe.chat("Describe.", [image], max_new_tokens=4)
    assert not pipe.llm.has_work()


def test_empty_file_and_non_image_file_raise_a_clear_error(pipe, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="empty"):
        pipe.chat("Describe.", [empty])
    with pytest.raises(ImageError, match="cannot decode"):
        pipe.chat("Describe.", [text])


def test_more_image_tags_than_images_is_a_clear_error(pipe):
    with pytest.raises(PromptError, match=r"2 <image> tag\(s\) but the request has 1 image"):
        pipe.chat("<image>\n<image>\nCompare.", [_image(6)])


def test_invalid_sampling_parameters_are_rejected(pipe):
    with pytest.raises(ValueError, match="top_p"):
        pipe.chat("Hi", top_p=0.0, do_sample=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe.chat("Hi", max_new_tokens=0)


def test_the_pipeline_refuses_what_the_server_refuses_naming_its_own_arguments(pipe):
    """One validation for both (docs/SERVING.md): the server's max_tiles rule, and max_new_tokens
    beyond the context named as the Pipeline's argument (the server names its max_tokens)."""
    top = pipe.config.max_num
    for tiles in (0, top + 1, 99):
        with pytest.raises(ValueError, match=rf"^max_tiles must be in \[1, {top}\], got {tiles}$"):
            pipe.chat("Hi", [_image(1)], max_tiles=tiles, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"^max_new_tokens \+ the prompt's \d+ tokens must fit this deployment's context"):
        pipe.chat("Hi", max_new_tokens=10_000_000)


def _finish_within(seconds: float, work) -> object:
    """Runs work() on a thread; a deadlock fails the test instead of hanging it."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", work()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "deadlock: the requests never finished"
    return out["value"]


def test_two_interleaved_streams_in_one_thread_do_not_deadlock(pipe):
    questions = ("Tell me a story.", "Describe a lake.")
    sampling = [dict(max_new_tokens=12, do_sample=True, top_k=0, seed=seed) for seed in (1, 2)]
    solo = [pipe.chat(q, **kw) for q, kw in zip(questions, sampling)]

    def interleave():
        streams = [pipe.stream(q, **kw) for q, kw in zip(questions, sampling)]
        parts = [[], []]
        live = [0, 1]
        while live:
            for i in list(live):
                try:
                    parts[i].append(next(streams[i]))
                except StopIteration:
                    live.remove(i)
        return ["".join(p) for p in parts]

    assert _finish_within(120, interleave) == solo
    assert solo[0] != solo[1]


def test_chats_from_several_threads_run_batched_and_each_gets_its_solo_reply(pipe, monkeypatch):
    questions = [f"Question {i}: tell me about number {i}." for i in range(4)]
    sampling = dict(max_new_tokens=16, do_sample=True, top_k=0, seed=7)  # same seed: the prompt decides
    solo = [pipe.chat(q, **sampling) for q in questions]
    assert len(set(solo)) > 1
    sizes = []
    monkeypatch.setattr(pipe.runner, "_on_step", lambda step: sizes.append(step.batch_size))
    barrier = threading.Barrier(len(questions))

    def ask(q):
        barrier.wait()
        return pipe.chat(q, **sampling)

    def all_threads():
        results = [None] * len(questions)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(questions[i]))) for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    assert _finish_within(120, all_threads) == solo
    assert max(sizes) > 1  # they shared engine steps


def test_a_pipeline_dropped_without_close_frees_its_model_and_stops_its_engine_thread(tiny):
    pipe = Pipeline.from_pretrained(tiny, vision_backend="torch")
    assert pipe.generate("Hello", max_new_tokens=2).token_ids  # the engine thread has run a request
    thread, dropped, model = pipe.runner._thread, weakref.ref(pipe), weakref.ref(pipe.llm.model)
    del pipe
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert dropped() is None and model() is None


def test_with_block_closes_the_pipeline_on_exit(tiny):
    with Pipeline.from_pretrained(tiny, vision_backend="torch") as pipe:
        assert pipe.generate("Hello", max_new_tokens=2).token_ids
    assert not pipe.runner._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        pipe.generate("Hello", max_new_tokens=2)
