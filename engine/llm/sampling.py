"""Per-request sampling with transformers' processor order and semantics.

repetition_penalty → (greedy: argmax) | temperature → top_k → top_p → multinomial.
Each request owns a torch.Generator, so a seeded request is reproducible whatever else shares its steps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50  # 0 disables; 50 is transformers' default
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_new_tokens: int = 0  # stop token and stop sequences are ignored until this many (benchmarks)
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's stop token
    # Token sequences that end generation once the output ends with one (TensorRT-LLM stop_words);
    # unlike stop token ids they stay in the output.
    stop_sequences: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        checks = (
            (self.max_new_tokens >= 1, "max_new_tokens must be ≥ 1"),
            (self.min_new_tokens >= 0, "min_new_tokens must be ≥ 0"),
            (self.temperature > 0 or not self.do_sample, "temperature must be > 0 when sampling"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be ≥ 0"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(self.stop_sequences), "stop_sequences must not contain an empty sequence"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self})")


class Sampler:
    def __init__(self, params: SamplingParams, prompt_ids: torch.Tensor, vocab_size: int):
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        self.seen = None
        if params.repetition_penalty != 1.0:
            # transformers penalises every id in the prompt and the output; fake (prompt-table) ids have no logit.
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[prompt_ids[prompt_ids < vocab_size]] = True

    def __call__(self, logits: torch.Tensor) -> int:
        # logits: [V] float -> next token id
        p = self.params
        if self.seen is not None:
            penalised = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if not p.do_sample:
            token = int(logits.argmax())
        else:
            token = self._sample(logits.float() / p.temperature)
        if self.seen is not None:
            self.seen[token] = True
        return token

    def _sample(self, logits: torch.Tensor) -> int:
        p = self.params
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            remove = cumulative <= 1 - p.top_p
            remove[-1] = False  # keep at least the most likely token
            logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
