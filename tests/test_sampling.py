"""engine.llm.sampling against transformers' own logits processors (the independent reference).

The reference pipeline is the one `generate()` builds: repetition penalty, then (when sampling)
temperature → top-k → top-p. The distribution our Sampler hands to `torch.multinomial` is
intercepted and compared with the softmax of the reference-processed logits.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine.llm.sampling import Sampler
from engine.sampling_params import SamplingParams

VOCAB = 1000


def reference_logits(params: SamplingParams, input_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    """transformers' processor chain for one sequence: [V] -> [V] (-inf where filtered)."""
    ids = torch.tensor([input_ids], dtype=torch.long)
    scores = logits.clone()[None].float()
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, scores)
    if params.do_sample:
        if params.temperature != 1.0:
            scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
        if params.top_k:
            scores = TopKLogitsWarper(params.top_k)(ids, scores)
        if params.top_p < 1.0:
            scores = TopPLogitsWarper(params.top_p)(ids, scores)
    return scores[0]


class MultinomialSpy:
    """Wraps torch.multinomial: records each distribution our Sampler samples from."""

    def __init__(self, monkeypatch):
        self.calls: list[torch.Tensor] = []
        self._real = torch.multinomial
        monkeypatch.setattr(torch, "multinomial", self)

    def __call__(self, probs, *args, **kwargs):
        self.calls.append(probs.detach().clone())
        return self._real(probs, *args, **kwargs)


def random_logits(gen: torch.Generator, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=gen) * scale


SAMPLING_CASES = [
    dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=0.7, top_k=50, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=1.3, top_k=0, top_p=0.9, repetition_penalty=1.0),
    dict(temperature=0.5, top_k=40, top_p=0.8, repetition_penalty=1.0),
    dict(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.3),
    dict(temperature=0.8, top_k=0, top_p=0.7, repetition_penalty=0.7),  # < 1 rewards repeats
    dict(temperature=2.0, top_k=5, top_p=0.5, repetition_penalty=1.8),
    dict(temperature=1.0, top_k=2000, top_p=1.0, repetition_penalty=1.1),  # top_k > vocab: no-op
]


@pytest.mark.parametrize("case", SAMPLING_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_distribution_equals_transformers_processor_chain(case, seed, monkeypatch):
    gen = torch.Generator().manual_seed(1000 + seed)
    prompt = torch.randint(0, VOCAB, (30,), generator=gen).tolist()
    params = SamplingParams(do_sample=True, seed=seed, **case)
    sampler = Sampler(params, torch.tensor(prompt), VOCAB)
    spy = MultinomialSpy(monkeypatch)
    history = list(prompt)
    for step in range(6):
        logits = random_logits(gen)
        # Make repeats matter: boost some already-seen ids to the top of the distribution.
        boosted = torch.tensor(history[-5:])
        logits[boosted] = logits.max() + torch.rand(len(boosted), generator=gen)
        expected = reference_logits(params, history, logits)
        token = sampler(logits.clone())
        probs = spy.calls[-1]
        assert len(spy.calls) == step + 1
        support = torch.isfinite(expected)
        assert torch.equal(probs > 0, support), f"step {step}: kept-token sets differ"
        torch.testing.assert_close(probs, expected.softmax(-1), rtol=1e-5, atol=1e-7)
        assert support[token], f"step {step}: sampled {token} outside the reference support"
        history.append(token)


@pytest.mark.parametrize(
    "top_k,top_p,kept",
    [(3, 1.0, 4), (5, 1.0, 6), (7, 1.0, 7), (0, 0.5, 2), (0, 0.75, 3), (0, 0.25, 1), (3, 0.5, 2), (5, 0.3, 2)],
)
def test_ties_and_exact_boundaries_are_filtered_like_transformers(top_k, top_p, kept, monkeypatch):
    # Four equal top logits share the k-th value, and without top-k their probabilities are
    # exactly 1/4 each, so the cumulative sums land exactly on the top-p thresholds.
    logits = torch.full((VOCAB,), -1e4)
    logits[[10, 200, 300, 999]] = 2.0
    if top_k:
        logits[[5, 6]] = 1.0
        logits[7] = 0.5
    params = SamplingParams(do_sample=True, top_k=top_k, top_p=top_p, seed=0)
    expected = reference_logits(params, [], logits).softmax(-1)
    spy = MultinomialSpy(monkeypatch)
    Sampler(params, torch.tensor([], dtype=torch.long), VOCAB)(logits)
    assert int((expected > 0).sum()) == kept  # the case really sits on a boundary
    assert torch.equal(spy.calls[-1] > 0, expected > 0)
    torch.testing.assert_close(spy.calls[-1], expected, rtol=1e-6, atol=0)


def test_samples_follow_reference_probabilities_without_interception():
    gen = torch.Generator().manual_seed(7)
    logits = random_logits(gen, scale=1.0)
    params = SamplingParams(do_sample=True, temperature=0.6, top_k=8, top_p=0.9, seed=123)
    expected = reference_logits(params, [], logits).softmax(-1)
    support = set(torch.nonzero(expected).flatten().tolist())
    assert 2 <= len(support) <= 8
    sampler = Sampler(params, torch.tensor([], dtype=torch.long), VOCAB)
    n = 4000
    counts = torch.zeros(VOCAB)
    for _ in range(n):
        counts[sampler(logits)] += 1
    assert set(torch.nonzero(counts).flatten().tolist()) == support
    # 4000 draws: standard error ≤ 0.008 per token; 0.04 is 5 sigma.
    assert (counts / n - expected).abs().max() < 0.04


@pytest.mark.parametrize("penalty", [1.5, 0.6, 3.0])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_greedy_with_repetition_penalty_is_argmax_of_reference_processed_logits(penalty, seed):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, VOCAB, (20,), generator=gen).tolist()
    params = SamplingParams(repetition_penalty=penalty, temperature=0.3, top_k=3)  # warpers unused when greedy
    sampler = Sampler(params, torch.tensor(prompt), VOCAB)
    history = list(prompt)
    changed = 0
    for _ in range(20):
        logits = random_logits(gen)
        # Put a seen id (positive or negative logit) near the top so the penalty decides the argmax.
        seen = history[int(torch.randint(0, len(history), (1,), generator=gen))]
        top = logits.max()
        logits[seen] = top + 0.1 if penalty > 1 else top - 0.1
        if int(torch.randint(0, 2, (1,), generator=gen)):
            logits -= top + 1  # all logits negative: the multiply branch
        expected = int(reference_logits(params, history, logits).argmax())
        changed += expected != int(logits.argmax())
        token = sampler(logits.clone())
        assert token == expected
        history.append(token)
    assert changed > 0  # the penalty actually moved the argmax in this test


def test_greedy_without_penalty_is_plain_argmax():
    gen = torch.Generator().manual_seed(5)
    sampler = Sampler(SamplingParams(), torch.tensor([1, 2, 3]), VOCAB)
    for _ in range(20):
        logits = random_logits(gen)
        assert sampler(logits) == int(logits.argmax())


def _sequence(params: SamplingParams, logits_seq: list[torch.Tensor]) -> list[int]:
    sampler = Sampler(params, torch.tensor([0, 1, 2]), VOCAB)
    return [sampler(logits) for logits in logits_seq]


def _flat_logits(n: int, seed: int = 11) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(VOCAB, generator=gen) * 0.1 for _ in range(n)]


def test_same_seed_gives_same_tokens_across_fresh_samplers():
    logits_seq = _flat_logits(60)
    params = SamplingParams(do_sample=True, top_k=0, repetition_penalty=1.2, seed=42)
    first = _sequence(params, logits_seq)
    torch.manual_seed(999)  # the global RNG state must not matter
    torch.rand(10)
    second = _sequence(params, logits_seq)
    assert first == second
    assert len(set(first)) > 30  # really sampled from a flat distribution, not a constant


def test_seeded_sampler_unaffected_by_interleaved_samplers():
    logits_seq = _flat_logits(40)
    params = SamplingParams(do_sample=True, top_k=0, seed=3)
    alone = _sequence(params, logits_seq)
    a = Sampler(params, torch.tensor([0]), VOCAB)
    other = Sampler(SamplingParams(do_sample=True, top_k=0), torch.tensor([0]), VOCAB)  # unseeded
    interleaved = []
    for logits in logits_seq:
        other(logits)
        interleaved.append(a(logits))
        torch.rand(3)
    assert interleaved == alone


def test_different_seeds_give_different_tokens():
    logits_seq = _flat_logits(30)
    sequences = {tuple(_sequence(SamplingParams(do_sample=True, top_k=0, seed=s), logits_seq)) for s in range(5)}
    assert len(sequences) == 5


@pytest.mark.parametrize("temperature,top_p,penalty", [(1.0, 1.0, 1.0), (2.5, 0.9, 1.0), (0.2, 0.5, 1.4)])
def test_top_k_one_equals_greedy(temperature, top_p, penalty):
    gen = torch.Generator().manual_seed(21)
    prompt = torch.randint(0, VOCAB, (15,), generator=gen)
    logits_seq = [random_logits(gen, scale=0.5) for _ in range(30)]
    common = dict(repetition_penalty=penalty, max_new_tokens=30)
    greedy = Sampler(SamplingParams(**common), prompt, VOCAB)
    top1 = Sampler(
        SamplingParams(do_sample=True, top_k=1, temperature=temperature, top_p=top_p, seed=4, **common), prompt, VOCAB
    )
    assert [top1(x) for x in logits_seq] == [greedy(x) for x in logits_seq]


@pytest.mark.parametrize("do_sample", [False, True])
def test_prompt_ids_beyond_vocab_are_ignored_by_repetition_penalty(do_sample, monkeypatch):
    gen = torch.Generator().manual_seed(8)
    real = torch.randint(0, VOCAB, (12,), generator=gen)
    fake = VOCAB + torch.arange(0, 300, 7)  # prompt-table ids: no logit of their own
    prompt = torch.cat([fake[:20], real, fake[20:]])
    params = SamplingParams(do_sample=do_sample, repetition_penalty=2.0, top_k=0, seed=1)
    spy = MultinomialSpy(monkeypatch)
    sampler = Sampler(params, prompt, VOCAB)
    history = prompt.tolist()
    for _ in range(5):
        logits = random_logits(gen)
        logits[real[:3]] = logits.max() + 0.5
        # transformers' processor also ignores ids ≥ the logits' width.
        expected = reference_logits(params, history, logits)
        assert torch.equal(expected, reference_logits(params, [i for i in history if i < VOCAB], logits))
        token = sampler(logits.clone())
        if do_sample:
            torch.testing.assert_close(spy.calls[-1], expected.softmax(-1), rtol=1e-5, atol=1e-7)
        else:
            assert token == int(expected.argmax())
        history.append(token)


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("max_new_tokens", dict(max_new_tokens=0)),
        ("max_new_tokens", dict(max_new_tokens=-3)),
        ("temperature", dict(do_sample=True, temperature=0.0)),
        ("temperature", dict(do_sample=True, temperature=-1.0)),
        ("top_p", dict(top_p=0.0)),
        ("top_p", dict(top_p=1.5)),
        ("top_p", dict(top_p=-0.1)),
        ("top_k", dict(top_k=-1)),
        ("repetition_penalty", dict(repetition_penalty=0.0)),
        ("repetition_penalty", dict(repetition_penalty=-1.0)),
    ],
)
def test_invalid_sampling_params_raise_value_error_naming_the_field(field, kwargs):
    # The message also echoes the whole params repr, so the field must lead the message.
    with pytest.raises(ValueError, match=rf"^{field} must"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_new_tokens=1),
        dict(temperature=0.0),  # greedy ignores temperature
        dict(top_p=1.0),
        dict(top_p=1e-6),
        dict(top_k=0),
        dict(repetition_penalty=1e-3),
        dict(do_sample=True, temperature=1e-3),
    ],
)
def test_boundary_sampling_params_are_accepted(kwargs):
    params = SamplingParams(**kwargs)
    assert all(getattr(params, k) == v for k, v in kwargs.items())
