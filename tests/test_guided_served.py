"""Structured outputs and log probabilities through tritonserver (gRPC streaming, HTTP generate) and
the OpenAI server (openai SDK), on the random-weight checkpoint: 200 sampled guided requests each way
all satisfy their guide (jsonschema / re.fullmatch, tests/guides.py); guided and unguided requests
sharing the engine's batch are all correct; a guide that does not compile is that request's 400; the
log probabilities equal log_softmax of transformers' logits at the served tokens."""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema

import numpy as np
import openai
import pytest
import torch
from openai import OpenAI
from transformers import InternVLForConditionalGeneration

from client import triton_metrics
from client.synthetic import synthetic_image
from client.triton_client import InternVLClient, ServerError
from engine.config import ModelConfig
from engine.prompt import PromptBuilder
from engine.tokenizer import TextTokenizer
from openai_api.server import running_server
from openai_api.settings import Settings
from tests.guides import DATE_TIME, GUIDES, PERSON, TAGS, satisfies

QUESTION = "Describe the image as JSON."
IMAGE = synthetic_image(30, 320, 240, "PNG")
REQUESTS = 200
TOLERANCE = 1e-4  # fp32 engine vs fp32 transformers (as tests/test_logprobs.py)


@pytest.fixture(scope="module")
def openai_url(server):
    with running_server(Settings(triton_url=server.grpc_url, port=0)) as url:
        yield url


@pytest.fixture(scope="module")
def openai_client(openai_url):
    client = OpenAI(base_url=f"{openai_url}/v1", api_key="unused")
    return client, client.models.list().data[0].id


def _triton(server, i: int) -> InternVLClient:
    """Every third request over HTTP generate, the others over gRPC."""
    return InternVLClient(server.http_url, protocol="http") if i % 3 == 0 else InternVLClient(server.grpc_url)


def _guide_kwargs(guide_type: str, guide: str) -> dict:
    """A guide as an openai SDK call sends it: a schema in response_format, a regex in vLLM's extension."""
    if guide_type == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "reply", "schema": json.loads(guide), "strict": True}}}
    return {"extra_body": {"structured_outputs": {"regex": guide}}}


def test_200_sampled_guided_requests_through_triton_all_satisfy_their_guide(server):
    def ask(i: int):
        guide_type, guide = GUIDES[i % len(GUIDES)]
        reply = _triton(server, i).generate(
            QUESTION, [IMAGE] if i % 10 == 0 else [], stream=i % 2 == 1, max_tokens=256,
            temperature=1.0, seed=i, guide_type=guide_type, guide=guide,
        )  # fmt: skip
        return guide_type, guide, reply

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(REQUESTS)))
    bad = [(i, r.text, r.finish_reason) for i, (t, g, r) in enumerate(replies) if not satisfies(t, g, r.text) or r.finish_reason != "stop"]
    assert not bad, bad[:3]
    # unguided, the same requests break their schemas: the check is not vacuous
    free = [_triton(server, i).chat(QUESTION, max_tokens=64, temperature=1.0, seed=i) for i in range(len(GUIDES))]
    assert not any(satisfies(*GUIDES[i], text) for i, text in enumerate(free))


def test_200_sampled_guided_requests_through_the_openai_sdk_all_satisfy_their_guide(openai_client):
    client, model = openai_client

    def ask(i: int):
        guide_type, guide = GUIDES[i % len(GUIDES)]
        messages = [{"role": "user", "content": QUESTION}]
        kwargs = dict(model=model, messages=messages, max_tokens=256, temperature=1.0, seed=i, **_guide_kwargs(guide_type, guide))
        if i % 2:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices and c.choices[0].finish_reason)
        else:
            completion = client.chat.completions.create(**kwargs)
            text, reason = completion.choices[0].message.content, completion.choices[0].finish_reason
        return guide_type, guide, text, reason

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(REQUESTS)))
    bad = [(i, text, reason) for i, (t, g, text, reason) in enumerate(replies) if not satisfies(t, g, text) or reason != "stop"]
    assert not bad, bad[:3]


def test_guided_and_unguided_requests_in_one_batch_are_all_correct(server):
    """4 guided and 4 unguided requests at once (the llm batches up to 8): each guided reply satisfies
    its guide, each unguided (greedy) reply equals the same request sent alone. The guided ones are
    sent once every unguided one streams, their guides compiled before (the server keeps compiled
    guides): compiling four guides at submit took about as long as the unguided replies, and now and
    then the two groups never shared a step."""
    client = InternVLClient(server.grpc_url)
    free = [dict(question=f"Tell me about number {i}.", max_tokens=48) for i in range(4)]
    guided = [dict(question=QUESTION, max_tokens=256, temperature=1.0, seed=50 + i, guide_type=t, guide=g) for i, (t, g) in enumerate(GUIDES)]
    alone = [client.chat(r.pop("question"), **r) for r in [dict(f) for f in free]]
    assert len(set(alone)) > 1  # input-sensitive: other prompts, other replies
    for request in guided:
        client.chat(**{**request, "max_tokens": 1})
    streaming = [threading.Event() for _ in free]

    def ask_free(i: int) -> str:
        request, text = dict(free[i]), []
        try:
            for delta in client.stream(request.pop("question"), keep_empty=True, **request):
                streaming[i].set()
                text.append(delta)
        finally:
            streaming[i].set()
        return "".join(text)

    def ask_guided(request: dict) -> str:
        assert all(event.wait(60) for event in streaming)
        request = dict(request)
        return client.generate(request.pop("question"), stream=True, **request).text

    before = _steps_by_batch_size(server)
    with ThreadPoolExecutor(8) as pool:
        frees = [pool.submit(ask_free, i) for i in range(len(free))]
        guideds = [pool.submit(ask_guided, r) for r in guided]
        replies = [f.result() for f in frees + guideds]
    after = _steps_by_batch_size(server)
    assert any(after[b] > before.get(b, 0) for b in after if b >= 5), after  # some step ran guided and unguided together
    assert replies[:4] == alone
    for (guide_type, guide), reply in zip(GUIDES, replies[4:]):
        assert satisfies(guide_type, guide, reply), reply


def _steps_by_batch_size(server) -> dict[int, float]:
    steps = triton_metrics.read(server.metrics_url)
    return {int(b): n for b, n in triton_metrics.by_label(steps, "internvl_llm_steps_total", "batch_size").items()}


def test_a_guide_that_does_not_compile_is_a_clear_error_of_its_request(server, openai_client):
    with pytest.raises(ServerError, match="GuideError: the regex guide does not compile"):
        InternVLClient(server.grpc_url).chat(QUESTION, max_tokens=8, guide_type="regex", guide="([a-z")
    with pytest.raises(ServerError, match="guided_decoding_guide_type must be one of json, json_schema, regex, ebnf_grammar"):
        InternVLClient(server.grpc_url, check_sampling=False).chat(QUESTION, max_tokens=8, guide_type="yaml", guide="a: 1")
    client, model = openai_client
    messages = [{"role": "user", "content": QUESTION}]
    with pytest.raises(openai.BadRequestError, match="the json_schema guide does not compile"):
        client.chat.completions.create(model=model, messages=messages, max_tokens=8, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    for stream in (False, True):  # the server stays well: a good guided request right after
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=64, extra_body={"structured_outputs": {"regex": DATE_TIME}})
        assert satisfies("regex", DATE_TIME, reply.choices[0].message.content)


def test_json_object_and_choice_and_grammar_through_the_openai_sdk(openai_client):
    client, model = openai_client
    messages = [{"role": "user", "content": QUESTION}]
    ask = dict(model=model, messages=messages, max_tokens=128, temperature=1.0)
    choices = ['say "yes"', "no", "maybe\nlater"]
    for seed in range(6):
        reply = client.chat.completions.create(seed=seed, extra_body={"structured_outputs": {"choice": choices}}, **ask)
        assert reply.choices[0].message.content in choices
    grammar = 'root ::= "colour: " ("red" | "green") ", size: " [0-9]'
    reply = client.chat.completions.create(seed=1, extra_body={"structured_outputs": {"grammar": grammar}}, **ask)
    assert satisfies("regex", r"colour: (red|green), size: [0-9]", reply.choices[0].message.content)
    tags = client.chat.completions.create(seed=2, extra_body={"structured_outputs": {"json": TAGS}}, **ask)
    assert satisfies("json_schema", json.dumps(TAGS), tags.choices[0].message.content)
    # json_object: xgrammar's built-in JSON (free whitespace, unbounded strings: a random model may run
    # out of tokens inside it, finish_reason "length"); every finished reply is JSON
    replies = [client.chat.completions.create(seed=seed, response_format={"type": "json_object"}, **ask).choices[0] for seed in range(8)]
    finished = [r.message.content for r in replies if r.finish_reason == "stop"]
    assert finished and all(isinstance(json.loads(text), (dict, list)) for text in finished)


@pytest.fixture(scope="module")
def reference(tiny):
    """-> (prompt ids of QUESTION without images, transformers' model, the tokenizer)."""
    config = ModelConfig.from_pretrained(tiny)
    tokenizer = TextTokenizer(tiny, config.skip_special_tokens)
    prompt = PromptBuilder(config, tokenizer).build(QUESTION, [], None, None).input_ids
    model = InternVLForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32).eval()
    return np.asarray(prompt), model, tokenizer


def reference_logprobs(reference, tokens: list[int]) -> torch.Tensor:
    """-> [len(tokens), V]: log_softmax of transformers' logits predicting each token after the prompt."""
    prompt, model, _ = reference
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[*prompt.tolist(), *tokens]])).logits[0].double()
    return torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


def greedy_tokens(reference, count: int) -> list[int]:
    prompt, model, _ = reference
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt.tolist()]), max_new_tokens=count, do_sample=False, min_new_tokens=count)
    return out[0, len(prompt) :].tolist()


def check_served_logprobs(reference, tokens: list[str], logprobs: list[float], tops: list[list[tuple[str, float]]], count: int):
    _, _, tokenizer = reference
    ids = greedy_tokens(reference, count)
    ref = reference_logprobs(reference, ids)
    assert tokens == tokenizer.token_texts(ids)  # the served tokens are the reference's greedy ones
    assert np.allclose(logprobs, [float(ref[i, t]) for i, t in enumerate(ids)], atol=TOLERANCE)
    for step, top in enumerate(tops):
        best = torch.topk(ref[step], len(top))
        assert np.allclose([v for _, v in top], best.values.numpy(), atol=TOLERANCE)
        if bool((best.values[:-1] - best.values[1:] > 2 * TOLERANCE).all()):  # no near-tie: the reference's order
            assert [t for t, _ in top] == tokenizer.token_texts(best.indices.tolist())
    other = reference_logprobs((reference[0][::-1].copy(), *reference[1:]), ids)
    assert float((ref - other).abs().max()) > 0.1  # input-sensitive: another prompt, other log-probabilities


@pytest.mark.parametrize("protocol", ["grpc-stream", "http"])
def test_triton_log_probabilities_equal_transformers(server, reference, protocol):
    count = 12
    client = InternVLClient(server.http_url, protocol="http") if protocol == "http" else InternVLClient(server.grpc_url)
    reply = client.generate(QUESTION, stream=protocol != "http", max_tokens=count, min_tokens=count, logprobs=True, top_logprobs=4)
    assert len(reply.logprobs) == reply.completion_tokens == count
    check_served_logprobs(reference, [e.token for e in reply.logprobs], [e.logprob for e in reply.logprobs], [e.top for e in reply.logprobs], count)
    assert reply.cum_logprob == pytest.approx(sum(e.logprob for e in reply.logprobs), abs=1e-3)
    assert client.generate(QUESTION, max_tokens=2).logprobs == []  # not asked: none


def test_openai_log_probabilities_equal_transformers_streamed_and_not(openai_client, reference):
    client, model = openai_client
    count = 10
    ask = dict(model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=count, logprobs=True, top_logprobs=3, extra_body={"min_tokens": count})
    whole = client.chat.completions.create(**ask).choices[0].logprobs.content
    chunks = [c for c in client.chat.completions.create(stream=True, **ask) if c.choices and c.choices[0].logprobs]
    streamed = [entry for c in chunks for entry in c.choices[0].logprobs.content]
    assert len(chunks) > 1  # per chunk, as the tokens come
    for entries in (whole, streamed):
        assert len(entries) == count and all(e.bytes == list(e.token.encode()) for e in entries)
        tops = [[(t.token, t.logprob) for t in e.top_logprobs] for e in entries]
        check_served_logprobs(reference, [e.token for e in entries], [e.logprob for e in entries], tops, count)
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be in \\[0, 20\\]"):
        client.chat.completions.create(**{**ask, "top_logprobs": 21})
    plain = client.chat.completions.create(**{**ask, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_the_api_docs_extraction_example_runs_as_written(openai_url, tmp_path, monkeypatch):
    """docs/API.md's openai SDK example (JSON-schema extraction from an image, with log probabilities),
    as written but for the server's port, in a directory holding photo.jpg."""
    section = Path(__file__).parents[1].joinpath("docs", "API.md").read_text(encoding="utf-8").split("### Structured outputs")[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1].replace("http://127.0.0.1:9000", openai_url)
    (tmp_path / "photo.jpg").write_bytes(synthetic_image(31, 640, 480, "JPEG"))
    monkeypatch.chdir(tmp_path)
    scope, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "docs/API.md", "exec"), scope)
    jsonschema.validate(json.loads(scope["reply"].choices[0].message.content), scope["schema"])
    assert len(printed.getvalue().splitlines()) == 4  # the object, then three tokens with their top 2
