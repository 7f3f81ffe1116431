"""Triton adapter: the engine's in-flight batcher as a decoupled model.

execute() only validates and submits; the engine loop (engine/llm/runner.py) steps everything in
flight on its own thread and answers each request through its response sender: one response per
token when streaming, one response with all tokens otherwise, the last one flagged FINAL. A request
whose sequence fails gets its own error response; the others run on.

Cancellation: Triton cancels a composing model's request only when the ensemble schedules it after
the client cancelled (core src/ensemble_scheduler/ensemble_scheduler.cc), never a decoupled step
already running, so a client that goes away sends `stop` (TensorRT-LLM's tensorrt_llm input of that
name) with its request id straight to this model (engine/protocol.py stop_request).

Structured output and log probabilities: guided_decoding_guide_type / guided_decoding_guide are
compiled by the engine when the request is submitted (a guide that does not compile is this request's
error); return_log_probs / top_logprobs add each token's scores to the response that carries it.

Prefix reuse: image_keys and image_tiles (one content key and tile count per image, from preprocess)
become the engine's table_keys, tiles × tokens_per_tile rows per image; the prompt tokens it reused
are counted in internvl_prefix_cache_hit_tokens_total.
"""

import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from engine.config import ModelConfig
from engine.flash import drop_compressed
from engine.llm.engine import LLMEngine, TokenEvent
from engine.llm.guided import GuideCompiler, tokenizer_info
from engine.llm.model import DecoderLM
from engine.llm.runner import EngineRunner, StepStats
from engine.protocol import image_rows, score_outputs, stop_sequences
from engine.sampling_params import SamplingParams, check_context
from engine.tokenizer import TextTokenizer
from triton_repo import allocator, pb
from triton_repo.metric_lock import MetricLock
from triton_repo.request_metrics import RequestMetrics

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        allocator.stub_settings()  # before this stub allocates anything big
        config, params = pb.model_parameters(args)
        self.dtypes = pb.decoupled_output_dtypes(config, "llm")
        model_config = ModelConfig.from_pretrained(params["checkpoint"])
        self.vocab_size, self.tokens_per_tile = model_config.text.vocab_size, model_config.vision.tokens_per_tile
        checkpoint, stop = params["checkpoint"], model_config.stop_token_id
        # the tokenizer is loaded and its vocabulary tables built at the first guided request only
        guides = GuideCompiler(lambda: tokenizer_info(TextTokenizer(checkpoint).fast, [stop]), self.vocab_size)
        engine = LLMEngine(
            DecoderLM.from_pretrained(params["checkpoint"], model_config.text, llm_weights=params["llm_weights"]),
            model_config.stop_token_id,
            max_batch_size=int(params["max_batch_size"]),
            max_num_tokens=int(params["max_num_tokens"]),
            max_seq_len=int(params["max_seq_len"]),
            prefix_cache_bytes=int(params["prefix_cache_mib"]) << 20,
            guides=guides,
        )
        self.max_seq_len = engine.max_seq_len
        self.metrics = MetricLock()  # updated from execute and from the engine loop's thread
        self.requests = RequestMetrics(self.metrics)
        self.steps = pb_utils.MetricFamily(  # must outlive its metrics
            name="internvl_llm_steps_total",
            description="engine steps by the number of sequences they ran together",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.step_metric = {n: self.steps.Metric(labels={"batch_size": str(n)}) for n in range(1, engine.max_batch_size + 1)}
        self.step_time = pb_utils.MetricFamily(
            name="internvl_llm_step_duration_us",
            description="cumulative wall time of engine steps, by whether they computed prompt tokens (prefill) or only decoded",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.step_time_metric = {phase: self.step_time.Metric(labels={"phase": phase}) for phase in ("prefill", "decode")}
        self.prefix_hits = pb_utils.MetricFamily(
            name="internvl_prefix_cache_hit_tokens_total",
            description="prompt tokens whose KV was copied from the prefix cache instead of computed",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.prefix_hit_metric = self.prefix_hits.Metric()
        self.hits_counted = 0  # engine.prefix_hit_tokens already added to the metric
        self.runner = EngineRunner(engine, on_step=self._on_step)

    def _on_step(self, step: StepStats) -> None:
        """On the engine loop's thread, after each step that ran sequences."""
        self.metrics.increment(self.step_metric[step.batch_size], 1)
        self.metrics.increment(self.step_time_metric["prefill" if step.prefilled else "decode"], round(step.seconds * 1e6))
        hits = self.runner.engine.prefix_hit_tokens
        if hits > self.hits_counted:
            self.metrics.increment(self.prefix_hit_metric, hits - self.hits_counted)
            self.hits_counted = hits

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            request_id = uuid.uuid4().hex
            try:
                if pb.scalar(request, "stop", False):
                    pb.stop_by_request_id(request, sender, self.runner.cancel_client)
                    continue
                ids, table, table_keys, params, streaming = self._parse(request)
                echo = pb.stream_echo(request, request_id, len(ids))
                stream = _Stream(sender, streaming, echo, self.dtypes, self._finished, params)
                self.requests.started()  # before submit: the final event may come first
                try:
                    self.runner.submit(
                        request_id, ids, table, params, stream.on_event, sender.is_cancelled, request.request_id() or None, table_keys
                    )
                except Exception:
                    self.requests.failed_to_start()
                    raise
            except Exception as error:  # noqa: BLE001 — this request fails alone
                sender.send(pb.error_response(error), flags=FINAL)
        return None

    def _finished(self, finish_reason: str) -> None:
        self.requests.finished(aborted=finish_reason == "abort")

    def _parse(self, request):
        ids = pb.item(request, "input_ids")
        tile_tokens = pb.item(request, "tile_tokens", required=False)
        if tile_tokens is not None:
            ids = drop_compressed(ids, self.vocab_size, self.tokens_per_tile, tile_tokens)
        end_id = pb.scalar(request, "end_id", None)
        params = SamplingParams.from_request(
            max_tokens=check_context(len(ids), pb.scalar(request, "request_output_len", None), self.max_seq_len),
            temperature=pb.scalar(request, "temperature", None),
            top_p=pb.scalar(request, "runtime_top_p", None),
            top_k=pb.scalar(request, "runtime_top_k", None),
            repetition_penalty=pb.scalar(request, "repetition_penalty", None),
            seed=pb.scalar(request, "seed", None),
            min_tokens=pb.scalar(request, "min_tokens", None),
            stop_token_ids=() if end_id is None else (int(end_id),),
            stop_sequences=stop_sequences(pb.item(request, "stop_words_list", required=False)),
            guide_type=pb.scalar(request, "guided_decoding_guide_type", None),
            guide=pb.scalar(request, "guided_decoding_guide", None),
            logprobs=pb.scalar(request, "return_log_probs", None),
            top_logprobs=pb.scalar(request, "top_logprobs", None),
        )
        table = pb.item(request, "prompt_embedding_table", required=False)
        return ids, table, self._table_keys(request), params, bool(pb.scalar(request, "streaming", False))

    def _table_keys(self, request) -> list[tuple[str, int]] | None:
        """(content key, prompt-table rows) per image; None without the inputs (no reuse across images)."""
        keys = pb.item(request, "image_keys", required=False)
        tiles = pb.item(request, "image_tiles", required=False)
        if keys is None or tiles is None:
            return None
        return image_rows([pb.utf8(key, "image_keys") for key in keys], tiles, self.tokens_per_tile)

    def finalize(self):
        self.runner.close()


class _Stream:
    """One request's responses, built from its engine events (called on the engine loop's thread)."""

    def __init__(self, sender, streaming: bool, echo: dict, dtypes: dict, on_finish, params: SamplingParams):
        self.sender, self.streaming, self.echo, self.dtypes, self.on_finish = sender, streaming, echo, dtypes, on_finish
        self.tokens: list[int] = []  # without streaming, the reply's tokens until the end
        self.scores = _Scores(params.top_logprobs) if params.logprobs else None

    def on_event(self, event: TokenEvent) -> None:
        if event.finish_reason is not None:
            self.on_finish(event.finish_reason)
        if event.finish_reason == "abort":  # the client cancelled: nobody reads a response
            self.sender.send(flags=FINAL)
            return
        if event.finish_reason == "error":
            self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(event.error)), flags=FINAL)
            return
        new = [] if event.token_id is None else [event.token_id]
        if self.scores is not None and new:
            self.scores.add(event)
        if not self.streaming:
            self.tokens += new
            if event.finish_reason is None:
                return
            new = self.tokens
        final = event.finish_reason is not None
        scores = None if self.scores is None else self.scores.take()
        self.sender.send(pb.llm_response(self.dtypes, new, event.finish_reason, self.echo, scores), flags=FINAL if final else 0)


class _Scores:
    """The log probabilities of the tokens not yet sent, and the reply's running sum."""

    def __init__(self, top: int):
        self.top, self.total = top, 0.0
        self.logprobs: list[float] = []
        self.top_pairs: list[tuple[tuple[int, float], ...]] = []

    def add(self, event: TokenEvent) -> None:
        self.logprobs.append(event.logprob)
        self.top_pairs.append(event.top_logprobs)
        self.total += event.logprob

    def take(self) -> dict[str, np.ndarray]:
        # -> the llm's score outputs for the tokens added since the last take (output_log_probs [n],
        # cum_log_probs [1], top_log_probs / top_token_ids [n, top])
        pairs = np.array(self.top_pairs, np.float64).reshape(len(self.top_pairs), self.top, 2)  # (id, logprob)
        scores = score_outputs(self.logprobs, self.total, pairs[..., 1], pairs[..., 0])
        self.logprobs, self.top_pairs = [], []
        return scores
