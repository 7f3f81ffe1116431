"""Triton adapter: the engine's in-flight batcher as a decoupled model.

execute() only validates and enqueues; one loop thread runs engine steps for everything in flight
and answers each request through its response sender: one response per token when streaming,
one response with all tokens otherwise, the last one flagged FINAL.
"""

import threading
import uuid

import numpy as np
from dataclasses import dataclass, field

import triton_python_backend_utils as pb_utils

from engine.config import ModelConfig
from engine.llm.engine import LLMEngine, TokenEvent
from engine.llm.model import DecoderLM
from engine.llm.sampling import SamplingParams
from engine.protocol import stop_sequences
from triton_repo import pb

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


@dataclass
class _Stream:
    sender: object
    streaming: bool
    echo: dict[str, np.ndarray]  # request_key and stop_words_list, returned with every response
    tokens: list[int] = field(default_factory=list)


class TritonPythonModel:
    def initialize(self, args):
        config, params = pb.model_parameters(args)
        self.dtypes = pb.decoupled_output_dtypes(config, "llm")
        model_config = ModelConfig.from_pretrained(params["checkpoint"])
        self.engine = LLMEngine(
            DecoderLM.from_pretrained(params["checkpoint"], model_config.text),
            model_config.stop_token_id,
            max_batch_size=int(params["max_batch_size"]),
            max_num_tokens=int(params["max_num_tokens"]),
        )
        self.streams: dict[str, _Stream] = {}
        self.step_family = pb_utils.MetricFamily(  # must outlive its metrics
            name="internvl_llm_steps_total",
            description="engine steps by the number of sequences they ran together",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.step_metric = {
            n: self.step_family.Metric(labels={"batch_size": str(n)}) for n in range(1, self.engine.max_batch_size + 1)
        }
        self.wakeup = threading.Event()
        self.stopping = False
        self.loop = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self.loop.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            request_id = uuid.uuid4().hex
            try:
                ids, table, params, streaming = self._parse(request)
                self.streams[request_id] = _Stream(sender, streaming, pb.stream_echo(request, request_id))
                self.engine.add_request(request_id, ids, table, params)
            except Exception as error:  # noqa: BLE001 — this request fails alone
                self.streams.pop(request_id, None)
                sender.send(pb.error_response(error), flags=FINAL)
        self.wakeup.set()
        return None

    def _parse(self, request):
        temperature = float(pb.scalar(request, "temperature", 0.0))
        top_p = float(pb.scalar(request, "runtime_top_p", 1.0))
        end_id = pb.scalar(request, "end_id", None)
        params = SamplingParams(
            max_new_tokens=int(pb.scalar(request, "request_output_len")),
            do_sample=temperature > 0,  # absent or 0: greedy
            temperature=temperature if temperature > 0 else 1.0,
            top_p=top_p if top_p > 0 else 1.0,  # 0 means "off", as clients of TensorRT-LLM send it
            top_k=int(pb.scalar(request, "runtime_top_k", 0)),
            repetition_penalty=float(pb.scalar(request, "repetition_penalty", 1.0)),
            seed=pb.scalar(request, "seed", None),
            min_new_tokens=int(pb.scalar(request, "min_tokens", 0)),
            stop_token_ids=() if end_id is None else (int(end_id),),
            stop_sequences=stop_sequences(pb.item(request, "stop_words_list", required=False)),
        )
        table = pb.item(request, "prompt_embedding_table", required=False)
        return pb.item(request, "input_ids"), table, params, bool(pb.scalar(request, "streaming", False))

    def _run(self):
        while not self.stopping:
            if not self.engine.has_work():
                self.wakeup.wait(0.5)
                self.wakeup.clear()
                continue
            try:
                self._step()
            except Exception as error:  # noqa: BLE001 — fail what is in flight, keep serving
                for request_id in list(self.streams):
                    self.engine.abort(request_id)
                    self.streams.pop(request_id).sender.send(pb.error_response(error), flags=FINAL)
                self.engine.step()  # retires the aborted requests

    def _step(self):
        for request_id, stream in list(self.streams.items()):
            if stream.sender.is_cancelled():
                self.engine.abort(request_id)
        events = self.engine.step()
        if self.engine.last_batch_size:
            self.step_metric[self.engine.last_batch_size].increment(1)
        for event in events:
            self._emit(event)

    def _emit(self, event: TokenEvent):
        stream = self.streams.get(event.request_id)
        if stream is None:
            return
        if event.token_id is not None:
            stream.tokens.append(event.token_id)
        final = event.finish_reason is not None
        if final:
            del self.streams[event.request_id]
            if event.finish_reason == "abort":  # the client cancelled: nobody reads a response
                stream.sender.send(flags=FINAL)
                return
        if stream.streaming or final:
            tokens = ([event.token_id] if event.token_id is not None else []) if stream.streaming else stream.tokens
            stream.sender.send(pb.llm_response(self.dtypes, tokens, final, stream.echo), flags=FINAL if final else 0)

    def finalize(self):
        self.stopping = True
        self.wakeup.set()
        self.loop.join(timeout=10)
