"""Log probabilities from the CPU engine against transformers: each generated token's logprob is
log_softmax of the reference model's logits at that position (teacher-forced on the same tokens),
and top_logprobs are the reference's most likely tokens, in order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import InternVLForConditionalGeneration

from engine.config import ModelConfig
from engine.llm.engine import LLMEngine
from engine.llm.model import DecoderLM
from engine.sampling_params import MAX_TOP_LOGPROBS, SamplingParamError, SamplingParams

TOLERANCE = 1e-4  # fp32 engine vs fp32 transformers, log-probabilities of a ~1000-token vocabulary
TOP = 5


@pytest.fixture(scope="module")
def setup(checkpoints):
    path = checkpoints["qwen3"]
    cfg = ModelConfig.from_pretrained(path)
    ref = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return cfg, DecoderLM.from_pretrained(path, cfg.text), ref


def generate(setup, prompt: np.ndarray, params: SamplingParams):
    cfg, model, _ = setup
    engine = LLMEngine(model, cfg.stop_token_id)
    engine.add_request("r", prompt, None, params)
    events = []
    while engine.has_work():
        events += [e for e in engine.step() if e.token_id is not None]
    return events


def reference_logprobs(setup, prompt: np.ndarray, tokens: list[int]) -> torch.Tensor:
    """-> [len(tokens), V]: log_softmax of transformers' logits predicting each generated token."""
    ids = torch.tensor([[*prompt.tolist(), *tokens]])
    with torch.no_grad():
        logits = setup[2](input_ids=ids).logits[0].double()
    return torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


def prompt(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, 12).astype(np.int32)


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_logprobs_and_top_logprobs_equal_log_softmax_of_transformers_logits(setup, sampling):
    params = SamplingParams(max_new_tokens=16, do_sample=sampling, temperature=1.3, top_k=0, seed=5, logprobs=True, top_logprobs=TOP)
    first, second = prompt(1), prompt(2)
    events = generate(setup, first, params)
    ref = reference_logprobs(setup, first, [e.token_id for e in events])
    other = reference_logprobs(setup, second, [e.token_id for e in events])
    assert float((ref - other).abs().max()) > 0.1  # input-sensitive: another prompt, other log-probabilities
    for step, event in enumerate(events):
        assert abs(event.logprob - float(ref[step, event.token_id])) <= TOLERANCE, step
        ids = [i for i, _ in event.top_logprobs]
        values = torch.tensor([v for _, v in event.top_logprobs], dtype=torch.float64)
        expected = torch.topk(ref[step], TOP)
        assert len(ids) == TOP and bool((values[:-1] >= values[1:]).all())  # most likely first
        assert torch.allclose(values, expected.values, atol=TOLERANCE)
        assert torch.allclose(ref[step, ids], values, atol=TOLERANCE)  # each listed id has its listed logprob
        gaps = expected.values[:-1] - expected.values[1:]
        if bool((gaps > 2 * TOLERANCE).all()):  # no near-tie: the order is the reference's exactly
            assert ids == expected.indices.tolist()
    if not sampling:  # greedy picks the most likely token: its logprob heads the list
        assert all(e.token_id == e.top_logprobs[0][0] for e in events)


def test_without_logprobs_events_carry_none(setup):
    events = generate(setup, prompt(3), SamplingParams(max_new_tokens=4))
    assert events and all(e.logprob is None and e.top_logprobs == () for e in events)
    events = generate(setup, prompt(3), SamplingParams(max_new_tokens=4, logprobs=True))
    assert all(e.logprob is not None and e.top_logprobs == () for e in events)


def test_top_logprobs_limits():
    with pytest.raises(SamplingParamError, match=f"top_logprobs must be in \\[0, {MAX_TOP_LOGPROBS}\\]"):
        SamplingParams(logprobs=True, top_logprobs=MAX_TOP_LOGPROBS + 1)
    with pytest.raises(SamplingParamError, match="top_logprobs needs logprobs"):
        SamplingParams(top_logprobs=3)


def test_the_pipeline_returns_each_tokens_logprobs_aligned_with_its_ids(setup, checkpoints):
    from engine.pipeline import Pipeline

    with Pipeline.from_pretrained(checkpoints["qwen3"], vision_backend="torch") as pipe:
        result = pipe.generate("Say something.", max_new_tokens=8, do_sample=True, seed=3, logprobs=True, top_logprobs=3)
        prompt_ids = np.asarray(pipe.prepare("Say something.").prompt.input_ids)
        assert pipe.generate("Say something.", max_new_tokens=2).logprobs is None
    assert len(result.logprobs) == len(result.token_ids) > 0
    ref = reference_logprobs(setup, prompt_ids, result.token_ids)
    for step, (token, (logprob, top)) in enumerate(zip(result.token_ids, result.logprobs)):
        assert abs(logprob - float(ref[step, token])) <= TOLERANCE
        values = torch.tensor([v for _, v in top], dtype=torch.float64)
        assert torch.allclose(values, torch.topk(ref[step], 3).values, atol=TOLERANCE)
