"""Triton adapter: generated token ids → reply text deltas (UTF-8 safe, stripped, cut at stop words).

Each response of the llm brings new tokens; the stream's ReplyStream (keyed by the request_key that
preprocess minted) turns them into the next text delta and is dropped at the final response.
"""

import time

import triton_python_backend_utils as pb_utils

from engine.config import ModelConfig
from engine.detokenize import ReplyStream
from engine.protocol import stop_sequences
from engine.tokenizer import TextTokenizer
from triton_repo import pb


class TritonPythonModel:
    def initialize(self, args):
        config, params = pb.model_parameters(args)
        self.dtypes = pb.output_dtypes(config)
        checkpoint = params["checkpoint"]
        self.tokenizer = TextTokenizer(checkpoint, ModelConfig.from_pretrained(checkpoint).skip_special_tokens)
        self.ttl = float(params["state_ttl_seconds"])
        self.streams: dict[str, tuple[ReplyStream, float]] = {}

    def execute(self, requests):
        responses = pb.answer_each(requests, self._postprocess)
        self._forget_abandoned()
        return responses

    def _postprocess(self, request):
        key = pb.scalar(request, "request_key")
        stream, _ = self.streams.get(key) or (None, 0.0)
        if stream is None:
            stops = stop_sequences(pb.item(request, "stop_words_list"))
            stream = ReplyStream(self.tokenizer, tuple(self.tokenizer.decode(ids) for ids in stops))
        text = stream.add(pb.item(request, "output_ids").tolist())
        if pb.scalar(request, "is_final"):
            text += stream.finish()
            self.streams.pop(key, None)
        else:
            self.streams[key] = (stream, time.monotonic())
        return pb_utils.InferenceResponse([pb.tensor("text_output", [text.encode("utf-8")], self.dtypes["text_output"])])

    def _forget_abandoned(self):
        """Streams whose client went away never see a final response."""
        cutoff = time.monotonic() - self.ttl
        for key in [k for k, (_, seen) in self.streams.items() if seen < cutoff]:
            del self.streams[key]
