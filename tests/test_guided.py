"""Guided decoding in the CPU engine (engine/llm/guided.py): sampled replies of a random-weight
checkpoint always satisfy their JSON schema (checked with jsonschema) or regex (re.fullmatch), the
same requests unguided do not, guided and unguided sequences share batches unchanged, and a bad guide
is its own request's error."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from engine.config import ModelConfig
from engine.llm.engine import LLMEngine
from engine.llm.guided import GuideCompiler, GuideError, tokenizer_info
from engine.llm.model import DecoderLM
from engine.sampling_params import SamplingParamError, SamplingParams
from engine.tokenizer import TextTokenizer, load_tokenizer
from tests.guides import DATE_TIME, GUIDES, PERSON, satisfies

@pytest.fixture(scope="module")
def setup(checkpoints):
    path = checkpoints["qwen3"]
    cfg = ModelConfig.from_pretrained(path)
    guides = GuideCompiler(lambda: tokenizer_info(load_tokenizer(path), [cfg.stop_token_id]), cfg.text.vocab_size)
    return cfg, DecoderLM.from_pretrained(path, cfg.text), guides, TextTokenizer(path)


def run(setup, requests: dict[str, SamplingParams], prompt: str = "Describe it.", **engine_args) -> dict[str, tuple[str, str]]:
    """-> {request id: (reply text, finish reason)}, all requests added before the first step."""
    cfg, model, guides, text = setup
    engine = LLMEngine(model, cfg.stop_token_id, guides=guides, **engine_args)
    ids = np.array(text.encode(prompt), dtype=np.int32)
    for rid, params in requests.items():
        engine.add_request(rid, ids, None, params)
    tokens, finish = drain(engine, list(requests))
    return {rid: (text.decode(tokens[rid]), finish[rid]) for rid in requests}


def drain(engine: LLMEngine, request_ids: list[str], after_step=lambda engine, tokens: None) -> tuple[dict, dict]:
    """Steps the engine until it is idle -> ({id: generated ids}, {id: finish reason})."""
    tokens, finish = {rid: [] for rid in request_ids}, {}
    while engine.has_work():
        for event in engine.step():
            if event.token_id is not None:
                tokens[event.request_id].append(event.token_id)
            if event.finish_reason:
                finish[event.request_id] = event.finish_reason
        after_step(engine, tokens)
    return tokens, finish


def sampled(i: int, guide_type: str | None, guide: str | None) -> SamplingParams:
    return SamplingParams(max_new_tokens=256, do_sample=True, temperature=1.0, top_k=0, seed=i, guide_type=guide_type, guide=guide)


def test_200_sampled_replies_all_satisfy_their_guide_and_unguided_ones_do_not(setup):
    requests = {f"r{i}": sampled(i, *GUIDES[i % len(GUIDES)]) for i in range(200)}
    replies = run(setup, requests)
    bad = [(rid, replies[rid]) for rid, p in requests.items() if not satisfies(p.guide_type, p.guide, replies[rid][0])]
    assert not bad, bad[:3]
    assert {reason for _, reason in replies.values()} == {"stop"}  # every reply completed its grammar
    # the same requests without their guides: the check is not vacuous
    free = run(setup, {f"r{i}": sampled(i, None, None) for i in range(len(GUIDES) * 2)})
    assert sum(satisfies(*GUIDES[i % len(GUIDES)], free[f"r{i}"][0]) for i in range(len(GUIDES) * 2)) == 0


def test_guided_and_unguided_requests_share_a_batch_unchanged(setup):
    greedy = {f"free{i}": SamplingParams(max_new_tokens=24, seed=i) for i in range(4)}
    guided = {f"guided{i}": sampled(100 + i, *GUIDES[i]) for i in range(4)}
    together = run(setup, {**greedy, **guided}, max_batch_size=8)
    for rid, params in greedy.items():
        assert together[rid] == run(setup, {rid: params})[rid]
    for rid, params in guided.items():
        assert satisfies(params.guide_type, params.guide, together[rid][0]), together[rid]
        assert together[rid] == run(setup, {rid: params})[rid]  # seeded: the batch around it changes nothing


def test_a_guide_that_does_not_compile_fails_its_request_alone(setup):
    cfg, model, guides, text = setup
    engine = LLMEngine(model, cfg.stop_token_id, guides=guides)
    ids = np.array(text.encode("Hi"), dtype=np.int32)
    for guide_type, guide, says in [("json_schema", "{not json", "json_schema guide does not compile"), ("regex", "([a-z", "regex guide does not compile"), ("ebnf_grammar", "root ::= undefined_rule", "ebnf_grammar guide does not compile")]:
        with pytest.raises(GuideError, match=says):
            engine.add_request("bad", ids, None, SamplingParams(guide_type=guide_type, guide=guide))
    with pytest.raises(GuideError) as raised:
        engine.add_request("bad", ids, None, SamplingParams(guide_type="regex", guide="([a"))
    assert str(raised.value) == "the regex guide does not compile: Regex parsing error at position 4: Unclosed '['"
    engine.add_request("good", ids, None, SamplingParams(max_new_tokens=4))
    events = [e for _ in range(8) for e in engine.step()]
    assert [e.finish_reason for e in events if e.finish_reason] == ["length"]


def test_length_cut_stop_sequences_and_a_reused_prefix_keep_guided_replies_right(setup):
    _, _, _, text = setup
    person = json.dumps(PERSON)
    cut = run(setup, {"cut": dataclasses.replace(sampled(7, "json_schema", person), max_new_tokens=5)})["cut"]
    assert cut[1] == "length" and cut[0].startswith('{"') and not satisfies("json_schema", person, cut[0])
    quote = tuple(text.encode('"'))
    stopped = run(setup, {"stop": dataclasses.replace(sampled(8, "json_schema", person), stop_sequences=(quote,))})["stop"]
    assert stopped == ('{"', "stop")  # the grammar's first quote ends it; stop words stay in the output
    # the second request reuses the first one's prompt blocks from the prefix cache: still guided
    twice = run(setup, {"a": sampled(9, "regex", DATE_TIME), "b": sampled(10, "regex", DATE_TIME)}, prompt="the same prompt " * 8)
    assert all(satisfies("regex", DATE_TIME, reply) for reply, _ in twice.values())


def test_aborting_a_guided_request_ends_it_alone(setup):
    cfg, model, guides, text = setup
    engine = LLMEngine(model, cfg.stop_token_id, guides=guides)
    ids = np.array(text.encode("Describe it."), dtype=np.int32)
    engine.add_request("aborted", ids, None, sampled(1, "json_schema", json.dumps(PERSON)))
    engine.add_request("kept", ids, None, sampled(2, "regex", DATE_TIME))

    def abort_at_3(engine: LLMEngine, tokens: dict) -> None:
        if len(tokens["aborted"]) == 3:
            engine.abort("aborted")

    tokens, finish = drain(engine, ["aborted", "kept"], abort_at_3)
    assert finish == {"aborted": "abort", "kept": "stop"} and len(tokens["aborted"]) == 3
    assert satisfies("regex", DATE_TIME, text.decode(tokens["kept"]))


def test_guide_fields_are_checked_like_the_other_sampling_values():
    with pytest.raises(SamplingParamError, match="guide_type must be one of json, json_schema, regex, ebnf_grammar"):
        SamplingParams(guide_type="yaml", guide="a: 1")
    with pytest.raises(SamplingParamError, match="guide is required with guide_type 'regex'"):
        SamplingParams(guide_type="regex")
    with pytest.raises(SamplingParamError, match="guide needs a guide_type"):
        SamplingParams(guide="[a-z]+")
    assert SamplingParams(guide_type="json").guide is None  # "json" (any JSON value) takes no text


def test_an_engine_without_the_vocabulary_refuses_guided_requests(setup):
    cfg, model, _, text = setup
    engine = LLMEngine(model, cfg.stop_token_id)
    with pytest.raises(ValueError, match="guided decoding needs the tokenizer's vocabulary"):
        engine.add_request("g", np.array(text.encode("Hi"), dtype=np.int32), None, SamplingParams(guide_type="json"))
