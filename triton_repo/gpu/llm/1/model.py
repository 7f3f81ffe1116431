"""Triton adapter (GPU): the ensemble's llm step over the tensorrt_llm model, via decoupled BLS.

execute() starts one thread per request and returns; the thread sends the mapped request
(engine/trtllm_request.py) to tensorrt_llm, forwards every response with the stream's echo
(request_key, stop_words_list, opens_reasoning, prompt_tokens), and ends the stream with an empty
is_final response carrying the finish_reason (a BLS response does
not say whether it was the last one); without streaming it sends one response with every token. The prompt table is passed on through DLPack (it may live in
GPU memory and be bf16, which numpy cannot hold): [1, T, Q, H] → [1, T·Q, H], no copy. Each image's
rows get a prompt_table_extra_ids id from its content key (image_keys, image_tiles from preprocess;
engine/trtllm_request.py table_extra_ids), so TensorRT-LLM's KV-cache reuse shares a repeated image's
blocks across requests and never one image's blocks with another. Guided decoding and return_log_probs
go to tensorrt_llm as its own inputs; with return_log_probs the wrapper also asks for output_log_probs /
cum_log_probs, and every response carries the scores of its own tokens (engine/trtllm_request.py
ReplyScores; empty arrays without return_log_probs, as on the CPU llm).
"""

import threading
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from engine.config import ModelConfig
from engine.trtllm_request import ReplyScores, finish_reason, response_tokens, table_extra_ids, tensorrt_llm_inputs
from triton_repo import pb
from triton_repo.metric_lock import MetricLock
from triton_repo.request_metrics import RequestMetrics

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
INPUTS = (
    "input_ids", "input_lengths", "request_output_len", "end_id", "stop_words_list", "streaming",
    "temperature", "runtime_top_p", "runtime_top_k", "repetition_penalty", "seed", "min_tokens",
    "guided_decoding_guide_type", "guided_decoding_guide", "return_log_probs", "top_logprobs",
)  # fmt: skip
OUTPUTS = ["output_ids", "sequence_length"]
LOG_PROB_OUTPUTS = ["output_log_probs", "cum_log_probs"]  # requested only with return_log_probs


class TritonPythonModel:
    def initialize(self, args):
        config, params = pb.model_parameters(args)
        self.dtypes = pb.decoupled_output_dtypes(config, "llm")
        model_config = ModelConfig.from_pretrained(params["checkpoint"])
        self.vocab_size, self.tokens_per_tile = model_config.text.vocab_size, model_config.vision.tokens_per_tile
        self.target = params["tensorrt_llm_model"]
        self.max_seq_len = int(params["max_seq_len"])
        self.stops: dict[str, list[threading.Event]] = {}  # Triton request id -> its live requests' stop flags
        self.stops_lock = threading.Lock()
        self.requests = RequestMetrics(MetricLock())  # updated from every request's thread

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                if pb.scalar(request, "stop", False):
                    pb.stop_by_request_id(request, sender, self._stop)
                    continue
            except Exception as error:  # noqa: BLE001 — this request fails alone
                sender.send(pb.error_response(error), flags=FINAL)
                continue
            threading.Thread(target=self._serve, args=(request, sender), daemon=True).start()
        return None

    def _stop(self, request_id: str) -> None:
        with self.stops_lock:
            for flag in self.stops.get(request_id, ()):
                flag.set()

    def _serve(self, request, sender):
        stop, request_id = threading.Event(), request.request_id()
        with self.stops_lock:
            self.stops.setdefault(request_id, []).append(stop)

        def cancelled() -> bool:
            return stop.is_set() or sender.is_cancelled()

        self.requests.started()
        aborted = False
        try:
            aborted = self._generate(request, sender, cancelled)
        finally:
            self.requests.finished(aborted)
            with self.stops_lock:
                self.stops[request_id].remove(stop)
                if not self.stops[request_id]:
                    del self.stops[request_id]

    def _generate(self, request, sender, cancelled) -> bool:
        """Serves the request; -> whether it was cancelled. After the FINAL response the sender is
        freed: calling sender.is_cancelled() then crashes tritonserver (SIGSEGV in
        TRITONBACKEND_ResponseFactoryIsCancelled, Triton 2.51)."""
        try:
            item = {name: value for name in INPUTS if (value := pb.item(request, name, required=False)) is not None}
            echo = pb.stream_echo(request, uuid.uuid4().hex, len(item["input_ids"]))
            key = bytes(echo["request_key"][0])
            table = pb_utils.get_input_tensor_by_name(request, "prompt_embedding_table")
            table = None if table is None else from_dlpack(table.to_dlpack())  # [1, T, Q, H]
            rows = 0 if table is None else table.shape[1] * table.shape[2]
            keys = pb.item(request, "image_keys", required=False)
            keys = None if keys is None else [pb.utf8(k, "image_keys") for k in keys]
            tiles = pb.item(request, "image_tiles", required=False)
            row_ids = table_extra_ids(rows, self.tokens_per_tile, keys, tiles, key)
            sent = tensorrt_llm_inputs(item, self.vocab_size, row_ids, self.max_seq_len)
            requested = int(sent["request_output_len"][0, 0])
            inputs = [pb_utils.Tensor(name, value) for name, value in sent.items()]
            if rows:
                flat = table.reshape(1, rows, table.shape[-1])
                inputs.append(pb_utils.Tensor.from_dlpack("prompt_embedding_table", to_dlpack(flat)))
            streaming = bool(pb.scalar(request, "streaming", False))
            scores = ReplyScores() if "return_log_probs" in sent else None
            outputs = OUTPUTS + ([] if scores is None else LOG_PROB_OUTPUTS)
            responses = pb_utils.InferenceRequest(
                model_name=self.target, inputs=inputs, requested_output_names=outputs
            ).exec(decoupled=True)
            collected = []  # without streaming the client gets one response holding every token
            generated = 0
            for response in responses:
                if cancelled():
                    responses.cancel()
                    break
                if response.has_error():
                    raise RuntimeError(response.error().message())
                tensors = {t.name(): t.as_numpy() for t in response.output_tensors()}
                if "output_ids" not in tensors:  # an empty response can close the stream
                    continue
                tokens = response_tokens(tensors["output_ids"], tensors["sequence_length"])
                generated += len(tokens)
                if scores is not None:
                    scores.add(tensors, len(tokens))  # without streaming they accumulate until the end
                if streaming:
                    sender.send(pb.llm_response(self.dtypes, tokens, None, echo, _take(scores)))
                else:
                    collected.append(tokens)
            if cancelled():
                sender.send(flags=FINAL)
                return True
            tokens = np.concatenate([np.zeros(0, np.int32), *collected])
            reason = finish_reason(generated, requested)
            sender.send(pb.llm_response(self.dtypes, tokens, reason, echo, _take(scores)), flags=FINAL)
            return False
        except Exception as error:  # noqa: BLE001 — this request fails alone
            aborted = cancelled()
            sender.send(pb.error_response(error), flags=FINAL)
            return aborted


def _take(scores: ReplyScores | None) -> dict[str, np.ndarray] | None:
    """The scores of the tokens since the last response; None (empty outputs) without return_log_probs."""
    return None if scores is None else scores.take()
