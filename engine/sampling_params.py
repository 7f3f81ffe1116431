"""Sampling parameters and their rules: one set of checks for the in-process Pipeline, the Triton
llm step (CPU engine and the GPU wrapper over tensorrt_llm) and the clients, which check a request
before sending it. No torch here, so the clients can import it.

Limits keep every sampling step finite: the sampler divides logits by the temperature and multiplies
or divides them by the repetition penalty, so values near 0 would overflow float32 (inf - inf =
NaN probabilities). A temperature below MIN_TEMPERATURE is raised to it, as vLLM does
(vllm/sampling_params.py: _MAX_TEMP = 1e-2, "may cause numerical errors nan or inf"); a repetition
penalty outside REPETITION_PENALTY_RANGE is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_TEMPERATURE = 1e-2
REPETITION_PENALTY_RANGE = (1e-3, 1e3)

# SamplingParams field -> the name a Triton / OpenAI-style request uses for it (the ensemble's inputs)
REQUEST_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "guide_type": "guided_decoding_guide_type",
    "guide": "guided_decoding_guide",
    "logprobs": "return_log_probs",
}
# TensorRT-LLM's guided decoding types (triton_backend/inflight_batcher_llm/src/utils.cc): "json" takes
# no guide text, the others need one (executor/guidedDecodingParams.cpp); engine/llm/guided.py
GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


class SamplingParamError(ValueError):
    """One sampling value breaks its rule; the message names the field, the rule and the value."""

    def __init__(self, field: str, rule: str, value):
        self.field, self.rule, self.value = field, rule, value
        shown = f"{value:.6g}" if isinstance(value, float) else repr(value)  # FP32 requests: 1e-38, not 9.99e-39
        super().__init__(f"{field} {rule}, got {shown}")


def check_context(prompt_tokens: int, max_tokens: int | None, max_seq_len: int, field: str = "max_tokens") -> int:
    """The request's token budget within the deployment's context (prompt + reply ≤ max_seq_len):
    max_tokens None means the rest of the context (vLLM's default); asking for more is an error, not
    a silent cut; `field` is the caller's name for it. -> max new tokens."""
    room = max_seq_len - prompt_tokens
    if room < 1:
        raise ValueError(f"the prompt has {prompt_tokens} tokens; this deployment's context is {max_seq_len} (prompt + reply)")
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise SamplingParamError(
            field,
            f"+ the prompt's {prompt_tokens} tokens must fit this deployment's context of {max_seq_len} tokens "
            f"(at most {room} new tokens)",
            max_tokens,
        )
    return max_tokens


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0  # values in (0, MIN_TEMPERATURE) sample as MIN_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 50  # 0 disables; 50 is transformers' default
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_new_tokens: int = 0  # stop token and stop sequences are ignored until this many (benchmarks)
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's stop token
    # Token sequences that end generation once the output ends with one (TensorRT-LLM stop_words);
    # unlike stop token ids they stay in the output.
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    guide_type: str | None = None  # structured output: one of GUIDE_TYPES, or None
    guide: str | None = None  # the schema / regex / grammar text; None for guide_type "json"
    # log probabilities of each generated token (log_softmax of the model's logits, before any
    # sampling transform or guide), and of the top_logprobs most likely tokens at that step
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        low, high = REPETITION_PENALTY_RANGE
        checks = (
            ("max_new_tokens", self.max_new_tokens >= 1, "must be ≥ 1"),
            ("min_new_tokens", self.min_new_tokens >= 0, "must be ≥ 0"),
            ("temperature", math.isfinite(self.temperature), "must be a finite number"),
            ("temperature", self.temperature > 0 or not self.do_sample, "must be > 0 when sampling"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be ≥ 0 (0 = off)"),
            ("repetition_penalty", low <= self.repetition_penalty <= high, f"must be in [{low:g}, {high:g}] (1 = off)"),
            ("seed", self.seed is None or 0 <= self.seed < 2**64, "must be in [0, 2^64)"),
            ("stop_sequences", all(self.stop_sequences), "must not contain an empty sequence"),
            ("stop_token_ids", all(t >= 0 for t in self.stop_token_ids), "must be ≥ 0"),
            ("guide_type", self.guide_type is None or self.guide_type in GUIDE_TYPES, f"must be one of {', '.join(GUIDE_TYPES)}"),
            ("guide", self.guide_type in (None, "json") or bool(self.guide), f"is required with guide_type {self.guide_type!r}"),
            ("guide", self.guide is None or self.guide_type is not None, "needs a guide_type"),
            ("top_logprobs", 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"must be in [0, {MAX_TOP_LOGPROBS}]"),
            ("top_logprobs", self.top_logprobs == 0 or self.logprobs, "needs logprobs"),
        )
        for field, ok, rule in checks:
            if not ok:
                raise SamplingParamError(field, rule, getattr(self, field))

    @property
    def effective_temperature(self) -> float:
        return max(self.temperature, MIN_TEMPERATURE)

    @classmethod
    def from_request(
        cls,
        max_tokens: int,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        min_tokens: int | None = None,
        stop_token_ids: tuple[int, ...] = (),
        stop_sequences: tuple[tuple[int, ...], ...] = (),
        guide_type: str | None = None,
        guide: str | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
    ) -> SamplingParams:
        """A request's fields with TensorRT-LLM's semantics (absent = default): temperature absent or 0
        is greedy, top_p absent or 0 and top_k absent or 0 switch those filters off; an empty
        guide_type is no guide (TensorRT-LLM's utils.cc reads the tensors only when present). Errors name
        the request's fields (max_tokens, min_tokens, guided_decoding_guide_type, ...)."""
        if temperature is not None and not temperature >= 0:
            raise SamplingParamError("temperature", "must be ≥ 0 (0 = greedy)", temperature)
        if top_p is not None and not 0 <= top_p <= 1:
            raise SamplingParamError("top_p", "must be in [0, 1] (0 = off)", top_p)
        sampling = bool(temperature)
        try:
            return cls(
                max_new_tokens=int(max_tokens),
                do_sample=sampling,
                temperature=float(temperature) if sampling else 1.0,
                top_p=float(top_p) if top_p else 1.0,
                top_k=0 if top_k is None else int(top_k),
                repetition_penalty=1.0 if repetition_penalty is None else float(repetition_penalty),
                seed=None if seed is None else int(seed),
                min_new_tokens=0 if min_tokens is None else int(min_tokens),
                stop_token_ids=tuple(stop_token_ids),
                stop_sequences=tuple(stop_sequences),
                guide_type=guide_type or None,
                guide=guide or None,
                logprobs=bool(logprobs),
                top_logprobs=0 if top_logprobs is None else int(top_logprobs),
            )
        except SamplingParamError as e:
            raise SamplingParamError(REQUEST_NAMES.get(e.field, e.field), e.rule, e.value) from None
