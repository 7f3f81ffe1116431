"""LLMEngine + DecoderLM against transformers' InternVLForConditionalGeneration (the reference),
and in-flight batching / chunked prefill / abort against the same request run alone."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from transformers import InternVLForConditionalGeneration

from engine.config import ModelConfig
from engine.llm.engine import LLMEngine, TokenEvent
from engine.llm.model import DecoderLM, SequenceInput
from engine.sampling_params import SamplingParamError, SamplingParams
from engine.weights import load_weights

FAMILIES = ("qwen2", "qwen3", "llama")
TEXT_IDS = 1024  # ids below are ordinary tokens of the tiny tokenizer; specials follow


@dataclasses.dataclass
class Setup:
    path: object
    cfg: ModelConfig
    model: DecoderLM
    ref: InternVLForConditionalGeneration

    @property
    def hidden(self) -> int:
        return self.cfg.text.hidden_size

    @property
    def vocab(self) -> int:
        return self.cfg.text.vocab_size


def load_setup(path) -> Setup:
    """Our decoder and transformers' model (the reference) on one checkpoint."""
    cfg = ModelConfig.from_pretrained(path)
    ref = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return Setup(path, cfg, DecoderLM.from_pretrained(path, cfg.text), ref)


@pytest.fixture(scope="module")
def setups(checkpoints):
    cache = {}

    def get(family: str) -> Setup:
        if family not in cache:
            cache[family] = load_setup(checkpoints[family])
        return cache[family]

    return get


@pytest.fixture(scope="module")
def perturbed(setups, tmp_path_factory):
    """The tiny checkpoints are saved with zero q/k/v biases and all-ones norm weights, which hides
    a decoder that ignores them. These copies have random biases and norm weights (the reference
    model is the perturbed transformers model itself; ours loads what it saved)."""
    cache = {}

    def get(family: str) -> Setup:
        if family not in cache:
            base = setups(family)
            ref = copy.deepcopy(base.ref)
            gen = torch.Generator().manual_seed(100 + FAMILIES.index(family))
            changed = 0
            with torch.no_grad():
                for name, param in ref.model.language_model.named_parameters():
                    if name.endswith(".bias"):
                        param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
                    elif name.endswith("norm.weight"):
                        param.copy_(1 + torch.randn(param.shape, generator=gen) * 0.3)
                    else:
                        continue
                    changed += 1
            assert changed
            out = tmp_path_factory.mktemp(f"perturbed-{family}")
            ref.save_pretrained(out)
            cache[family] = Setup(out, base.cfg, DecoderLM.from_pretrained(out, base.cfg.text), ref)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def qwen3(setups) -> Setup:
    return setups("qwen3")


def text_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, TEXT_IDS, size=n).astype(np.int32)


def run_alone(setup: Setup, ids, params: SamplingParams, table=None, **engine_kwargs) -> list[TokenEvent]:
    engine = LLMEngine(setup.model, setup.cfg.stop_token_id, **engine_kwargs)
    engine.add_request("solo", ids, table, params)
    events = []
    steps = 0
    while engine.has_work():
        events += engine.step()
        steps += 1
        assert steps < 10_000
    assert all(e.request_id == "solo" for e in events)
    return events


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def check_stream_shape(events: list[TokenEvent], reason: str) -> None:
    """Every event but the last is a running token; the last carries the finish reason."""
    assert events, "no events"
    assert all(e.finish_reason is None and e.token_id is not None for e in events[:-1])
    assert events[-1].finish_reason == reason


@torch.no_grad()
def reference_generate(setup: Setup, ids, n: int) -> list[int]:
    input_ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)[None]
    out = setup.ref.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=setup.cfg.stop_token_id,
        pad_token_id=setup.cfg.stop_token_id,
    )
    return out[0, input_ids.shape[1] :].tolist()


@torch.no_grad()
def reference_generate_with_table(setup: Setup, ids, table: np.ndarray, n: int) -> list[int]:
    """Greedy loop on the reference decoder fed inputs_embeds: embedding rows for real ids, table rows for fake ids."""
    lm, head = setup.ref.model.language_model, setup.ref.lm_head
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    fake = ids >= setup.vocab
    embeds = lm.embed_tokens(ids.masked_fill(fake, 0))
    embeds[fake] = torch.as_tensor(table)[ids[fake] - setup.vocab]
    out = []
    for _ in range(n):
        hidden = lm(inputs_embeds=embeds[None], use_cache=False).last_hidden_state
        token = int(head(hidden[0, -1]).argmax())
        out.append(token)
        embeds = torch.cat([embeds, lm.embed_tokens(torch.tensor([token]))])
    return out


def random_table(setup: Setup, rng: np.random.Generator, rows: int) -> np.ndarray:
    scale = float(setup.ref.get_input_embeddings().weight.detach().std())  # the checkpoint's table, whatever ours stores
    return (rng.standard_normal((rows, setup.hidden)) * scale * 2).astype(np.float32)


def prompt_with_table(setup: Setup, rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """[text] [fake 0..rows-1] [text]: an image-like run of prompt-table ids inside a text prompt."""
    table = random_table(setup, rng, rows)
    fake = setup.vocab + np.arange(rows)
    ids = np.concatenate([text_ids(rng, 4), fake, text_ids(rng, 6), fake[:3]]).astype(np.int32)
    return ids, table


# ------------------------------------------------------------------ parity with transformers


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_generate(family, setups):
    setup = setups(family)
    rng = np.random.default_rng(FAMILIES.index(family))
    for length, n in [(1, 8), (9, 12), (37, 10)]:
        ids = text_ids(rng, length)
        events = run_alone(setup, ids, SamplingParams(max_new_tokens=n))
        check_stream_shape(events, "length")
        ours = tokens_of(events)
        assert len(ours) == n
        assert ours == reference_generate(setup, ids, n), (family, length)
        assert len(set(ours)) > 1  # the model is not stuck on one token


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_table_rows_match_reference_fed_inputs_embeds(family, setups):
    setup = setups(family)
    rng = np.random.default_rng(3)
    ids, table = prompt_with_table(setup, rng, rows=8)
    n = 10
    expected = reference_generate_with_table(setup, ids, table, n)
    assert tokens_of(run_alone(setup, ids, SamplingParams(max_new_tokens=n), table)) == expected
    # Chunked prefill splitting the table run gives the same tokens.
    assert tokens_of(run_alone(setup, ids, SamplingParams(max_new_tokens=n), table, max_num_tokens=5)) == expected
    # The table really matters: other rows, other tokens.
    other = random_table(setup, rng, 8)
    assert tokens_of(run_alone(setup, ids, SamplingParams(max_new_tokens=n), other)) != expected


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_with_random_biases_and_norm_weights(family, perturbed):
    setup = perturbed(family)
    ids = text_ids(np.random.default_rng(40), 19)
    assert tokens_of(run_alone(setup, ids, SamplingParams(max_new_tokens=10))) == reference_generate(setup, ids, 10)


def check_chunked_batched_logits(setup: Setup, rng: np.random.Generator) -> None:
    """Two prompts run through DecoderLM.forward in uneven chunks, sharing every call (one's prefill
    chunk beside the other's), give the reference's logits at each chunk's last position."""
    prompts = [torch.as_tensor(text_ids(rng, 41), dtype=torch.long), torch.as_tensor(text_ids(rng, 23), dtype=torch.long)]
    chunks = [[7, 1, 5, 12, 1, 1, 14], [1, 9, 2, 6, 1, 3, 1]]
    with torch.no_grad():
        expected = [setup.ref(input_ids=p[None]).logits[0] for p in prompts]
    caches = [setup.model.new_cache(len(p)) for p in prompts]
    starts = [0, 0]
    for step in range(len(chunks[0])):
        inputs = []
        for i, p in enumerate(prompts):
            n = chunks[i][step]
            inputs.append(SequenceInput(p[starts[i] : starts[i] + n], starts[i], caches[i], None))
            starts[i] += n
        logits = setup.model.forward(inputs)
        assert logits.shape == (2, setup.vocab)
        for i in range(2):
            torch.testing.assert_close(logits[i], expected[i][starts[i] - 1], rtol=0, atol=2e-3)
    assert starts == [len(p) for p in prompts]


@pytest.mark.parametrize("weights", ["stock", "perturbed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_batched_forward_logits_match_reference_logits(family, weights, setups, perturbed):
    """Token parity hides small attention errors behind wide logit margins: compare logits too."""
    setup = setups(family) if weights == "stock" else perturbed(family)
    check_chunked_batched_logits(setup, np.random.default_rng(30 + FAMILIES.index(family)))


# ------------------------------------------------------------------ in-flight batching


def _batch_requests(setup: Setup):
    rng = np.random.default_rng(11)
    table_ids, table = prompt_with_table(setup, rng, rows=6)
    table_ids2, table2 = prompt_with_table(setup, rng, rows=9)
    # (request id, join step, input ids, prompt table, params)
    return [
        ("a", 0, text_ids(rng, 5), None, SamplingParams(max_new_tokens=10)),
        ("b", 0, text_ids(rng, 23), None, SamplingParams(max_new_tokens=3)),
        ("c", 2, table_ids, table, SamplingParams(max_new_tokens=14)),
        ("d", 3, text_ids(rng, 1), None, SamplingParams(max_new_tokens=8, repetition_penalty=1.3)),
        ("e", 3, text_ids(rng, 31), None, SamplingParams(max_new_tokens=6, do_sample=True, top_k=0, temperature=1.5, seed=5)),
        ("f", 7, table_ids2, table2, SamplingParams(max_new_tokens=9)),
    ]


def _run_batched(setup: Setup, requests, aborts=(), **engine_kwargs):
    """Adds each request at its join step; aborts[(request id, step)]; -> events per request, batch sizes."""
    engine = LLMEngine(setup.model, setup.cfg.stop_token_id, **engine_kwargs)
    events: dict[str, list[TokenEvent]] = {r[0]: [] for r in requests}
    sizes = []
    step = 0
    pending = sorted(requests, key=lambda r: r[1])
    while pending or engine.has_work():
        while pending and pending[0][1] <= step:
            rid, _, ids, table, params = pending.pop(0)
            engine.add_request(rid, ids, table, params)
        for rid, at in aborts:
            if at == step:
                engine.abort(rid)
        for event in engine.step():
            events[event.request_id].append(event)
        sizes.append(engine.last_batch_size)
        step += 1
        assert step < 10_000
    return events, sizes


def _solo(setup: Setup, requests, **engine_kwargs) -> dict[str, list[TokenEvent]]:
    out = {}
    for rid, _, ids, table, params in requests:
        out[rid] = [dataclasses.replace(e, request_id=rid) for e in run_alone(setup, ids, params, table, **engine_kwargs)]
    return out


def check_in_flight_batch_of_four(setup: Setup, rng: np.random.Generator, long_prompt: int) -> list[int]:
    """Four different requests (text, prompt table, a long prompt, sampled) joining at different steps:
    each gets its solo tokens, and the greedy ones the reference's. -> the step batch sizes."""
    table_ids, table = prompt_with_table(setup, rng, rows=6)
    long_ids = text_ids(rng, long_prompt)
    requests = [  # (request id, join step, input ids, prompt table, params)
        ("text", 0, text_ids(rng, 5), None, SamplingParams(max_new_tokens=12)),
        ("table", 0, table_ids, table, SamplingParams(max_new_tokens=10)),
        ("long", 1, long_ids, None, SamplingParams(max_new_tokens=8)),
        ("sampled", 2, text_ids(rng, 13), None, SamplingParams(max_new_tokens=9, do_sample=True, temperature=1.3, seed=3)),
    ]
    solo = _solo(setup, requests, max_num_tokens=32)
    batched, sizes = _run_batched(setup, requests, max_batch_size=4, max_num_tokens=32)
    for rid, *_ in requests:
        assert batched[rid] == solo[rid], rid
    assert max(sizes) == 4
    assert tokens_of(solo["text"]) == reference_generate(setup, requests[0][2], 12)
    assert tokens_of(solo["table"]) == reference_generate_with_table(setup, table_ids, table, 10)
    assert tokens_of(solo["long"]) == reference_generate(setup, long_ids, 8)
    return sizes


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_in_flight_batching_gives_each_request_its_solo_tokens(family, setups):
    setup = setups(family)
    requests = _batch_requests(setup)
    solo = _solo(setup, requests)
    batched, sizes = _run_batched(setup, requests, max_batch_size=3)
    for rid, *_ in requests:
        assert batched[rid] == solo[rid], rid
        check_stream_shape(batched[rid], "length")
        assert len(tokens_of(batched[rid])) == dict((r[0], r[4]) for r in requests)[rid].max_new_tokens
    assert max(sizes) == 3  # requests shared steps, never more than max_batch_size
    assert sum(s > 1 for s in sizes) >= 5


def test_requests_wait_for_a_free_slot_in_arrival_order(qwen3):
    rng = np.random.default_rng(2)
    requests = [(f"r{i}", 0, text_ids(rng, 4 + i), None, SamplingParams(max_new_tokens=3 + i)) for i in range(4)]
    solo = _solo(qwen3, requests)
    batched, sizes = _run_batched(qwen3, requests, max_batch_size=1)
    assert max(sizes) == 1
    assert batched == solo
    # One at a time: r0 finishes before r1 emits anything, and so on.
    engine = LLMEngine(qwen3.model, qwen3.cfg.stop_token_id, max_batch_size=1)
    for rid, _, ids, table, params in requests:
        engine.add_request(rid, ids, table, params)
    order = []
    while engine.has_work():
        order += [e.request_id for e in engine.step()]
    assert order == [r for r, *_ in requests for _ in range(len(solo[r]))]


@pytest.mark.parametrize("max_num_tokens", [1, 7])
def test_chunked_prefill_gives_the_same_tokens_as_whole_prompts(max_num_tokens, qwen3):
    requests = _batch_requests(qwen3)
    whole, whole_sizes = _run_batched(qwen3, requests, max_batch_size=3)
    chunked, sizes = _run_batched(qwen3, requests, max_batch_size=3, max_num_tokens=max_num_tokens)
    assert chunked == whole
    assert len(sizes) > len(whole_sizes)  # prompts really were split over several steps


def test_chunked_prefill_alone_matches_transformers(qwen3):
    ids = text_ids(np.random.default_rng(8), 45)
    events = run_alone(qwen3, ids, SamplingParams(max_new_tokens=8), max_num_tokens=7)
    assert tokens_of(events) == reference_generate(qwen3, ids, 8)


# ------------------------------------------------------------------ finishing


def _first_new_index(tokens: list[int], at_least: int) -> int:
    return next(i for i in range(at_least, len(tokens)) if tokens[i] not in tokens[:i])


def test_stop_token_ids_end_the_request_without_emitting_the_stop_token(qwen3):
    ids = text_ids(np.random.default_rng(21), 12)
    greedy = tokens_of(run_alone(qwen3, ids, SamplingParams(max_new_tokens=10)))
    k = _first_new_index(greedy, 4)
    unused = next(t for t in range(qwen3.vocab) if t not in greedy)
    events = run_alone(qwen3, ids, SamplingParams(max_new_tokens=10, stop_token_ids=(unused, greedy[k])))
    assert [e.token_id for e in events] == greedy[:k] + [None]
    check_stream_shape(events, "stop")


def test_model_stop_token_ends_the_request(qwen3):
    ids = text_ids(np.random.default_rng(22), 7)
    greedy = tokens_of(run_alone(qwen3, ids, SamplingParams(max_new_tokens=10)))
    k = _first_new_index(greedy, 3)
    engine = LLMEngine(qwen3.model, stop_token_id=greedy[k])
    engine.add_request("x", ids, None, SamplingParams(max_new_tokens=10))
    events = []
    while engine.has_work():
        events += engine.step()
    assert [e.token_id for e in events] == greedy[:k] + [None]
    assert events[-1] == TokenEvent("x", None, "stop")


@pytest.mark.parametrize("n", [1, 2, 5])
def test_max_new_tokens_ends_with_length_after_exactly_n_tokens(n, qwen3):
    ids = text_ids(np.random.default_rng(n), 6)
    events = run_alone(qwen3, ids, SamplingParams(max_new_tokens=n))
    check_stream_shape(events, "length")
    assert len(events) == n
    assert tokens_of(events) == reference_generate(qwen3, ids, n)


@pytest.fixture(scope="module")
def short_context(qwen3) -> Setup:
    """The qwen3 weights with a 48-token context."""
    text = dataclasses.replace(qwen3.cfg.text, max_position_embeddings=48)
    weights = load_weights(qwen3.path, "language_model.")
    lm_head = load_weights(qwen3.path, "lm_head.", required=False).get("weight")
    return Setup(qwen3.path, qwen3.cfg, DecoderLM(text, weights, lm_head), qwen3.ref)


@pytest.mark.parametrize("length,expected_new", [(40, 8), (47, 1), (20, 25)])
def test_output_runs_up_to_the_context_length(length, expected_new, short_context):
    ids = text_ids(np.random.default_rng(length), length)
    events = run_alone(short_context, ids, SamplingParams(max_new_tokens=expected_new), max_num_tokens=16)
    check_stream_shape(events, "length")
    assert len(tokens_of(events)) == expected_new
    assert tokens_of(events) == reference_generate(short_context, ids, expected_new)


@pytest.mark.parametrize("length", [40, 47, 20])
def test_more_new_tokens_than_the_context_holds_is_refused_not_cut(length, short_context):
    engine = LLMEngine(short_context.model, short_context.cfg.stop_token_id)
    room = 48 - length
    with pytest.raises(SamplingParamError, match=rf"max_new_tokens \+ the prompt's {length} tokens .* \(at most {room} new tokens\), got {room + 1}"):
        engine.add_request("x", text_ids(np.random.default_rng(0), length), None, SamplingParams(max_new_tokens=room + 1))
    assert not engine.has_work()


@pytest.mark.parametrize("length", [48, 60])
def test_prompt_that_fills_the_context_is_rejected(length, short_context):
    engine = LLMEngine(short_context.model, short_context.cfg.stop_token_id)
    with pytest.raises(ValueError, match="context"):
        engine.add_request("x", text_ids(np.random.default_rng(0), length), None, SamplingParams())
    assert not engine.has_work()


# ------------------------------------------------------------------ abort


def test_abort_running_request_reports_abort_and_others_match_solo(qwen3):
    requests = _batch_requests(qwen3)
    solo = _solo(qwen3, requests)
    # "c" is mid-decode at step 8; "f" is still waiting for a slot at step 9.
    batched, _ = _run_batched(qwen3, requests, aborts=[("c", 8), ("f", 9), ("nobody", 4)], max_batch_size=3)
    assert batched["f"] == [TokenEvent("f", None, "abort")]  # aborted before it ever ran
    assert batched["c"][-1] == TokenEvent("c", None, "abort")
    assert all(e.finish_reason is None for e in batched["c"][:-1])
    c_tokens = tokens_of(batched["c"])
    assert 0 < len(c_tokens) < len(tokens_of(solo["c"]))
    assert c_tokens == tokens_of(solo["c"])[: len(c_tokens)]
    for rid in ("a", "b", "d", "e"):
        assert batched[rid] == solo[rid], rid


def test_abort_of_waiting_request_never_runs_it(qwen3):
    rng = np.random.default_rng(4)
    engine = LLMEngine(qwen3.model, qwen3.cfg.stop_token_id, max_batch_size=1)
    engine.add_request("run", text_ids(rng, 5), None, SamplingParams(max_new_tokens=4))
    engine.add_request("wait", text_ids(rng, 5), None, SamplingParams(max_new_tokens=4))
    first = engine.step()
    engine.abort("wait")
    events = []
    while engine.has_work():
        events += engine.step()
    assert [e for e in events if e.request_id == "wait"] == [TokenEvent("wait", None, "abort")]
    assert len(first + [e for e in events if e.request_id == "run"]) == 4


# ------------------------------------------------------------------ bad inputs


def _bad_inputs(setup: Setup):
    h, v = setup.hidden, setup.vocab
    table = np.zeros((4, h), np.float32)
    return {
        "fake ids without a table": ([1, v, 2], None, r"prompt-table row 0 .* 0 rows"),
        "fake ids with an empty table": ([1, v + 1], np.zeros((0, h), np.float32), r"prompt-table row 1 .* 0 rows"),
        "fake id beyond the table": ([1, v + 4, 2], table, r"prompt-table row 4 .* 4 rows"),
        "wrong table width": ([1, v, 2], np.zeros((4, h + 1), np.float32), rf"prompt_table must be \[P, {h}\]"),
        "1-D table": ([1, v, 2], np.zeros(h, np.float32), rf"prompt_table must be \[P, {h}\]"),
        "empty input_ids": ([], None, "non-empty"),
        "2-D input_ids": ([[1, 2, 3]], None, "1-D"),
        "negative ids": ([3, -1, 4], None, "≥ 0"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "fake ids without a table",
        "fake ids with an empty table",
        "fake id beyond the table",
        "wrong table width",
        "1-D table",
        "empty input_ids",
        "2-D input_ids",
        "negative ids",
    ],
)
def test_bad_request_is_rejected_with_value_error(case, qwen3):
    ids, table, message = _bad_inputs(qwen3)[case]
    engine = LLMEngine(qwen3.model, qwen3.cfg.stop_token_id)
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", np.array(ids, dtype=np.int32), table, SamplingParams())
    assert not engine.has_work()
    assert engine.step() == []


def test_min_new_tokens_suppresses_stop_ids_like_transformers(qwen3):
    ids = text_ids(np.random.default_rng(23), 9)
    greedy = tokens_of(run_alone(qwen3, ids, SamplingParams(max_new_tokens=12)))
    k = _first_new_index(greedy, 2)
    stop_ids = (greedy[k], qwen3.cfg.stop_token_id)
    params = SamplingParams(max_new_tokens=12, min_new_tokens=k + 3, stop_token_ids=stop_ids[:1])
    ours = tokens_of(run_alone(qwen3, ids, params))
    with torch.no_grad():
        out = qwen3.ref.generate(
            input_ids=torch.as_tensor(ids, dtype=torch.int64)[None],
            max_new_tokens=12,
            min_new_tokens=k + 3,
            do_sample=False,
            eos_token_id=list(stop_ids),
        )
    expected = out[0, len(ids) :].tolist()
    if expected[-1] in stop_ids:
        expected = expected[:-1]
    assert ours == expected
    assert ours[:k] == greedy[:k] and len(ours) >= k + 3  # the stop at position k was suppressed
