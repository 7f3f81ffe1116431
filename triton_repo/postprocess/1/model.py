"""Triton adapter: generated token ids → reply deltas (UTF-8 safe, stripped, cut at stop words), the
same deltas split into reasoning and content, and the counts clients need (OpenAI `usage`).

Each response of the llm brings new tokens; the stream's ReplyParts (keyed by the request_key that
preprocess minted) turns them into the next deltas and is dropped at the final response. Log
probabilities (when asked) pass through per token, with each token's text: they cover every generated
token, also those whose text the reply holds back or cuts (a stop word).
"""

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from engine.config import ModelConfig
from engine.detokenize import ReplyParts
from engine.protocol import stop_sequences
from engine.tokenizer import TextTokenizer
from triton_repo import allocator, pb


class TritonPythonModel:
    def initialize(self, args):
        allocator.stub_settings()  # before this stub allocates anything big
        config, params = pb.model_parameters(args)
        self.dtypes = pb.output_dtypes(config)
        checkpoint = params["checkpoint"]
        self.tokenizer = TextTokenizer(checkpoint, ModelConfig.from_pretrained(checkpoint).skip_special_tokens)
        self.ttl = float(params["state_ttl_seconds"])
        self.streams: dict[str, tuple[ReplyParts, float]] = {}

    def execute(self, requests):
        responses = pb.answer_each(requests, self._postprocess)
        self._forget_abandoned()
        return responses

    def _postprocess(self, request):
        key = pb.scalar(request, "request_key")
        parts, _ = self.streams.get(key) or (None, 0.0)
        if parts is None:
            stops = stop_sequences(pb.item(request, "stop_words_list"))
            parts = ReplyParts(
                self.tokenizer, tuple(self.tokenizer.decode(ids) for ids in stops), bool(pb.scalar(request, "opens_reasoning"))
            )
        final = bool(pb.scalar(request, "is_final"))
        text, reasoning, content = parts.add(pb.item(request, "output_ids").tolist(), final)
        finish_reason = pb.scalar(request, "finish_reason")
        if final:
            self.streams.pop(key, None)
            finish_reason = "stop" if parts.stopped else finish_reason
        else:
            self.streams[key] = (parts, time.monotonic())
        d = self.dtypes
        return pb_utils.InferenceResponse(
            [
                pb.tensor("text_output", [text.encode()], d["text_output"]),
                pb.tensor("reasoning_output", [reasoning.encode()], d["reasoning_output"]),
                pb.tensor("content_output", [content.encode()], d["content_output"]),
                pb.tensor("prompt_tokens", [pb.scalar(request, "prompt_tokens")], d["prompt_tokens"]),
                pb.tensor("completion_tokens", [parts.tokens], d["completion_tokens"]),
                pb.tensor("finish_reason", [finish_reason.encode()], d["finish_reason"]),
                *self._scores(request),
            ]
        )

    def _scores(self, request) -> list:
        """The llm's log probabilities with the tokens' texts in place of their ids."""
        logprobs, top_ids = pb.item(request, "output_log_probs"), pb.item(request, "top_token_ids")
        tokens = self.tokenizer.token_texts(pb.item(request, "output_ids")) if len(logprobs) else []
        top = [t.encode() for t in self.tokenizer.token_texts(top_ids.reshape(-1))]
        d = self.dtypes
        return [
            pb.tensor("output_log_probs", logprobs, d["output_log_probs"]),
            pb.tensor("output_tokens", [t.encode() for t in tokens], d["output_tokens"]),
            pb.tensor("cum_log_probs", pb.item(request, "cum_log_probs"), d["cum_log_probs"]),
            pb.tensor("top_log_probs", pb.item(request, "top_log_probs"), d["top_log_probs"]),
            pb.tensor("top_tokens", np.array(top, object).reshape(top_ids.shape), d["top_tokens"]),
        ]

    def _forget_abandoned(self):
        """Streams whose client went away never see a final response."""
        cutoff = time.monotonic() - self.ttl
        for key in [k for k, (_, seen) in self.streams.items() if seen < cutoff]:
            del self.streams[key]
