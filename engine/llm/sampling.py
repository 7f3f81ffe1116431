"""Per-request sampling with transformers' processor order and semantics.

repetition_penalty → (greedy: argmax) | temperature → top_k → top_p → multinomial.
Each request owns a torch.Generator, so a seeded request is reproducible whatever else shares its steps.
"""

from __future__ import annotations

import random

import torch

from engine.sampling_params import SamplingParams


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
            token = self._sample(logits.float() / p.effective_temperature)
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
        if not bool(torch.isfinite(probs).all()):  # the parameter limits prevent it; this names it if not
            raise FloatingPointError(f"sampling produced non-finite probabilities (temperature {p.temperature}, repetition_penalty {p.repetition_penalty})")
        return int(torch.multinomial(probs, 1, generator=self.generator))
