"""End to end through a real tritonserver: served output == in-process pipeline == transformers."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import pytest

from client import triton_metrics
from client.chat import main as chat_cli
from client.synthetic import synthetic_image
from client.triton_client import InternVLClient, ServerError
from engine.pipeline import Pipeline
from tests import reference_chat, reference_preprocess
from tests.test_generation import SYSTEM

MAX_NEW = 12


@pytest.fixture(scope="module")
def pipe(tiny) -> Pipeline:
    with Pipeline.from_pretrained(tiny, vision_backend="onnxruntime") as pipe:
        yield pipe



IMAGES = [synthetic_image(1, 640, 400, "PNG"), synthetic_image(2, 300, 800, "JPEG"), synthetic_image(3, 500, 500, "WEBP")]
CASES = {  # name: (question, image indices)
    "text_only": ("Hello, who are you?", ()),
    "one_image": ("Describe the image in detail.", (0,)),
    "two_images": ("Image-1: <image>\nImage-2: <image>\nWhat differs?", (1, 2)),
}


def _clients(server) -> dict[str, tuple[InternVLClient, bool]]:
    return {
        "grpc-stream": (InternVLClient(server.grpc_url), True),
        "grpc": (InternVLClient(server.grpc_url), False),
        "http-stream": (InternVLClient(server.http_url, protocol="http"), True),
        "http": (InternVLClient(server.http_url, protocol="http"), False),
    }


@cache
def _transformers_reply(path, question, image_ids, history=None):
    tiles = [reference_preprocess.load_image(io.BytesIO(IMAGES[i])).numpy() for i in image_ids]
    query, _ = reference_chat.chat_query("internvl2_5", SYSTEM, question, [len(t) for t in tiles], history)
    stop = reference_chat.tokenizer(path).convert_tokens_to_ids("<|im_end|>")
    tokens, _ = reference_chat.generate(path, query, np.concatenate(tiles) if tiles else None, stop, MAX_NEW)
    return reference_chat.reply(path, tokens, "<|im_end|>")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ["grpc-stream", "grpc", "http-stream", "http"])
def test_served_greedy_reply_equals_pipeline_and_transformers(server, pipe, tiny, case, mode):
    question, ids = CASES[case]
    images = [IMAGES[i] for i in ids]
    expected = pipe.chat(question, images, max_new_tokens=MAX_NEW)
    assert expected == _transformers_reply(tiny, question, ids)
    client, stream = _clients(server)[mode]
    assert client.chat(question, images, stream=stream, max_tokens=MAX_NEW) == expected


@pytest.mark.parametrize("mode", ["grpc-stream", "http"])
def test_served_follow_up_turn_with_history(server, pipe, tiny, mode):
    images = [IMAGES[0]]
    first, history = pipe.chat("Describe the image.", images, max_new_tokens=MAX_NEW, return_history=True)
    expected = pipe.chat("What colour dominates?", images, history, max_new_tokens=MAX_NEW)
    assert expected == _transformers_reply(tiny, "What colour dominates?", (0,), tuple(history))
    client, stream = _clients(server)[mode]
    assert client.chat("What colour dominates?", images, stream=stream, history=history, max_tokens=MAX_NEW) == expected


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_streaming_chunks_join_to_the_non_streaming_reply(server, protocol):
    client = InternVLClient(server.grpc_url if protocol == "grpc" else server.http_url, protocol=protocol)
    chunks = list(client.stream("Tell me a long story.", [IMAGES[0]], max_tokens=40))
    assert len(chunks) > 5
    assert "".join(chunks) == client.chat("Tell me a long story.", [IMAGES[0]], max_tokens=40)


def test_sampling_stop_words_tiles_and_system_prompt_reach_the_engine(server, pipe):
    client = InternVLClient(server.grpc_url)
    sampled = dict(temperature=1.3, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=7)
    served = client.chat("Tell me a story.", max_tokens=20, **sampled)
    local = pipe.chat("Tell me a story.", max_new_tokens=20, do_sample=True, **sampled)
    assert served == local
    assert served != client.chat("Tell me a story.", max_tokens=20, **{**sampled, "seed": 8})

    full = pipe.chat("Tell me a story.", max_new_tokens=30)
    stop = next(w for w in full.split()[len(full.split()) // 2 :] if len(w) >= 2)[:2]
    expected = pipe.chat("Tell me a story.", max_new_tokens=30, stop=[stop])
    assert expected == full[: full.index(stop)].strip()
    assert client.chat("Tell me a story.", max_tokens=30, stop=[stop], stream=True) == expected

    assert client.chat("Describe.", [IMAGES[0]], max_tiles=2, max_tokens=MAX_NEW) == pipe.chat(
        "Describe.", [IMAGES[0]], max_tiles=2, max_new_tokens=MAX_NEW
    )
    assert client.chat("Hi", system_prompt="Be brief.", max_tokens=MAX_NEW) == pipe.chat(
        "Hi", system_message="Be brief.", max_new_tokens=MAX_NEW
    )


def _metrics(server):
    return triton_metrics.read(server.metrics_url)


def test_concurrent_requests_are_batched_and_each_correct(server, pipe):
    jobs = [  # (question, images, max_tokens): different images, prompts and lengths
        ("Describe the image.", [IMAGES[0]], 30),
        ("What is in the picture?", [IMAGES[1]], 8),
        ("Image-1: <image>\nImage-2: <image>\nCompare.", [IMAGES[2], IMAGES[0]], 20),
        ("Hello, who are you?", [], 25),
        ("Count the objects.", [IMAGES[2]], 5),
        ("Tell me a story.", [], 40),
        ("Describe the colours.", [IMAGES[1]], 15),
        ("What time of day is it?", [IMAGES[0]], 12),
    ]
    expected = [pipe.chat(q, imgs, max_new_tokens=n) for q, imgs, n in jobs]
    before, started = _metrics(server), time.perf_counter()
    client = InternVLClient(server.grpc_url)
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: client.chat(job[0], job[1], stream=True, max_tokens=job[2]), jobs))
    elapsed = time.perf_counter() - started
    assert replies == expected
    added = triton_metrics.added(before, _metrics(server))
    steps = {int(b): n for b, n in triton_metrics.by_label(added, "internvl_llm_steps_total", "batch_size").items()}
    assert sum(n for b, n in steps.items() if b > 1) > 0, f"no engine step ran more than one sequence: {steps}"
    # the engine's steps run one after another on its thread: their times add up to less than the window
    step_us = triton_metrics.by_label(added, "internvl_llm_step_duration_us", "phase")
    assert step_us["prefill"] > 0 and step_us["decode"] > 0, step_us
    assert step_us["prefill"] + step_us["decode"] <= elapsed * 1e6, (step_us, elapsed)
    vision_us = triton_metrics.total(added, "internvl_vision_encode_duration_us")  # one instance: one execution at a time
    assert 0 < vision_us <= elapsed * 1e6, (vision_us, elapsed)


@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        ([b"\x89PNG\r\n\x1a\n" + b"\x00" * 64], {}, "cannot decode image"),
        ([synthetic_image(4, 1800, 1800, "PNG")] * 3, {}, "the request has 3 images; this deployment allows 2"),
        ([IMAGES[0]], {"max_tiles": 99}, "max_tiles must be in"),
        ([], {"history": [["only one element"]]}, "history"),
    ],
    ids=["corrupt-image", "too-many-images", "bad-max-tiles", "bad-history"],
)
def test_bad_request_gets_a_clear_error_while_good_ones_succeed(server, pipe, images, kwargs, message):
    client = InternVLClient(server.grpc_url)
    good = ("Describe the image.", [IMAGES[1]])
    expected = pipe.chat(*good, max_new_tokens=20)
    with ThreadPoolExecutor(3) as pool:
        goods = [pool.submit(client.chat, *good, stream=True, max_tokens=20) for _ in range(2)]
        bad = pool.submit(client.chat, "Describe.", images, stream=True, max_tokens=10, **kwargs)
        with pytest.raises(ServerError, match=message):
            bad.result()
        assert [g.result() for g in goods] == [expected, expected]
    assert server.ready()
    assert client.chat(*good, max_tokens=20) == expected


def test_base64_images_in_json_and_the_cli(server, pipe, tmp_path, capsys):
    image = tmp_path / "a.webp"
    image.write_bytes(IMAGES[2])
    history = tmp_path / "chat.json"
    expected = pipe.chat("Describe.", [IMAGES[2]], max_new_tokens=MAX_NEW)
    assert chat_cli(["--http", "--url", server.http_url, "--image", str(image), "--max-tokens", str(MAX_NEW), "--history", str(history), "Describe."]) == 0
    assert capsys.readouterr().out.strip() == expected
    follow_up = pipe.chat("And the colours?", [IMAGES[2]], [("<image>\nDescribe.", expected)], max_new_tokens=MAX_NEW)
    assert chat_cli(["--url", server.grpc_url, "--image", str(image), "--max-tokens", str(MAX_NEW), "--history", str(history), "And the colours?"]) == 0
    assert capsys.readouterr().out.strip() == follow_up
    assert chat_cli(["--url", server.grpc_url, "--image", str(tmp_path / "missing.png"), "Hi"]) == 1
    assert chat_cli(["--url", server.grpc_url, "--max-tiles", "0", "--image", str(image), "Hi"]) == 1
    assert "error from server: " in capsys.readouterr().err


def test_a_long_request_does_not_block_a_new_short_one(server, pipe):
    client = InternVLClient(server.grpc_url)
    long_stream = client.stream("Tell me a very long story.", keep_empty=True, max_tokens=3000)
    next(long_stream)  # the long request is decoding
    short = client.chat("Describe the image.", [IMAGES[0]], stream=True, max_tokens=5)
    assert short == pipe.chat("Describe the image.", [IMAGES[0]], max_new_tokens=5)
    assert next(long_stream, None) is not None  # still generating after the short one finished
    long_stream.close()  # cancels the long request
    assert client.chat("Hi", max_tokens=3) == pipe.chat("Hi", max_new_tokens=3)


def test_interactive_cli_keeps_the_conversation(server, pipe, tmp_path, capsys, monkeypatch):
    image = tmp_path / "a.png"
    image.write_bytes(IMAGES[0])
    monkeypatch.setattr("sys.stdin", io.StringIO("Describe.\nAnd the colours?\n"))
    assert chat_cli(["--url", server.grpc_url, "--interactive", "--image", str(image), "--max-tokens", str(MAX_NEW)]) == 0
    first, history = pipe.chat("Describe.", [IMAGES[0]], max_new_tokens=MAX_NEW, return_history=True)
    second = pipe.chat("And the colours?", [IMAGES[0]], history, max_new_tokens=MAX_NEW)
    assert capsys.readouterr().out.replace("> ", "").split("\n")[:2] == [first, second]
