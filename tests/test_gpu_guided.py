"""Structured output and log probabilities on the GPU llm step (engine/trtllm_request.py and
triton_repo/gpu/llm/1/model.py), checked against what TensorRT-LLM's Triton backend declares and
reads (triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt; inflight_batcher_llm/
src/utils.cc getGuidedDecodingParamsFromTensors / getOutputConfigFromTensors) and answers
(model_instance_state.cc fillTritonResponse: output_log_probs [1, beams, N], cum_log_probs [1, beams];
batch_manager/llmRequest.cpp createResult: in streaming, the whole list so far in every response)."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2

from engine.config import ModelConfig
from engine.sampling_params import SamplingParams
from engine.trtllm_request import ReplyScores, response_log_probs, tensorrt_llm_inputs
from tests.repository_checks import full_dims, parse_configs
from tests.test_gpu_repository import _call_llm, _llm_request, _numpy_dtype, serve_wrapper, write_gpu_repository

NO_ROWS = np.zeros(0, np.uint64)
SCHEMA = '{"type": "object", "properties": {"name": {"type": "string"}}}'
TYPE = model_config_pb2.DataType.Name


def _item(**extra) -> dict[str, np.ndarray]:
    """One llm request without the batch dimension, as the wrapper reads it (pb.item)."""
    base = {"input_ids": np.array([1, 2, 3], np.int32), "input_lengths": np.array([3], np.int32),
            "request_output_len": np.array([8], np.int32)}  # fmt: skip
    return {**base, **extra}


def _text(value: bytes) -> np.ndarray:
    return np.array([value], dtype=object)  # a BYTES input as pb_utils' as_numpy gives it


def test_tensorrt_llm_config_declares_the_guide_and_log_prob_tensors_as_upstream(tiny, tmp_path):
    _, configs = write_gpu_repository(tiny, tmp_path)
    inputs = {t.name: t for t in configs["tensorrt_llm"].input}
    outputs = {t.name: t for t in configs["tensorrt_llm"].output}
    for name in ("guided_decoding_guide_type", "guided_decoding_guide"):
        t = inputs[name]
        assert (TYPE(t.data_type), list(t.dims), t.optional, t.allow_ragged_batch, t.HasField("reshape")) == ("TYPE_STRING", [1], True, True, False)
    t = inputs["return_log_probs"]
    assert (TYPE(t.data_type), list(t.dims), t.optional, list(t.reshape.shape)) == ("TYPE_BOOL", [1], True, [])
    assert t.HasField("reshape")
    assert (TYPE(outputs["cum_log_probs"].data_type), list(outputs["cum_log_probs"].dims)) == ("TYPE_FP32", [-1])
    assert (TYPE(outputs["output_log_probs"].data_type), list(outputs["output_log_probs"].dims)) == ("TYPE_FP32", [-1, -1])


def test_gpu_llm_declares_the_cpu_llms_guide_and_log_prob_tensors(tiny, tmp_path):
    from build.repository import build

    write_gpu_repository(tiny, tmp_path / "gpu")
    build(tiny, tmp_path / "cpu")
    cpu, gpu = (parse_configs(tmp_path / t / "model_repository", ["llm"])["llm"] for t in ("cpu", "gpu"))
    inputs = ("guided_decoding_guide_type", "guided_decoding_guide", "return_log_probs", "top_logprobs")
    outputs = ("output_log_probs", "cum_log_probs", "top_log_probs", "top_token_ids")
    for names, cpu_tensors, gpu_tensors in ((inputs, cpu.input, gpu.input), (outputs, cpu.output, gpu.output)):
        cpu_tensors, gpu_tensors = {t.name: t for t in cpu_tensors}, {t.name: t for t in gpu_tensors}
        for name in names:
            assert cpu_tensors[name] == gpu_tensors[name], name
    outputs = {t.name: (TYPE(t.data_type), list(t.dims)) for t in gpu.output}
    assert outputs["output_log_probs"] == outputs["cum_log_probs"] == ("TYPE_FP32", [-1])
    assert outputs["top_log_probs"] == ("TYPE_FP32", [-1, -1]) and outputs["top_token_ids"] == ("TYPE_INT32", [-1, -1])


def test_a_guided_request_with_log_probs_matches_the_tensorrt_llm_config(tiny, tmp_path):
    """Every tensor sent is a tensorrt_llm input of that dtype and of rank batch + dims (the client side
    of reshape); the BYTES inputs hold one string each, since utils.cc reads the raw buffer."""
    config, configs = write_gpu_repository(tiny, tmp_path)
    trtllm = configs["tensorrt_llm"]
    declared = {t.name: t for t in trtllm.input}
    item = _item(guided_decoding_guide_type=_text(b"json_schema"), guided_decoding_guide=_text(SCHEMA.encode()),
                 return_log_probs=np.array([True]), top_logprobs=np.array([0], np.int32))  # fmt: skip
    sent = tensorrt_llm_inputs(item, config.text.vocab_size, NO_ROWS, 100)
    assert {"guided_decoding_guide_type", "guided_decoding_guide", "return_log_probs"} <= set(sent)
    assert "top_logprobs" not in sent  # ours, not tensorrt_llm's
    for name, value in sent.items():
        dims = full_dims(trtllm, declared[name])
        assert value.dtype == _numpy_dtype(declared[name].data_type), name
        assert value.ndim == len(dims) and all(d in (-1, n) for d, n in zip(dims, value.shape)) and value.shape[0] == 1, name
    assert sent["guided_decoding_guide_type"].shape == (1, 1) and sent["guided_decoding_guide_type"][0, 0] == b"json_schema"
    assert sent["guided_decoding_guide"][0, 0].decode() == SCHEMA and sent["return_log_probs"][0, 0]


def test_guides_and_log_probs_are_sent_only_when_asked(tiny):
    vocab = ModelConfig.from_pretrained(tiny).text.vocab_size
    plain = tensorrt_llm_inputs(_item(return_log_probs=np.array([False])), vocab, NO_ROWS, 100)
    assert not {"guided_decoding_guide_type", "guided_decoding_guide", "return_log_probs"} & set(plain)
    empty = tensorrt_llm_inputs(_item(guided_decoding_guide_type=_text(b"")), vocab, NO_ROWS, 100)  # "" = no guide
    assert "guided_decoding_guide_type" not in empty
    json = tensorrt_llm_inputs(_item(guided_decoding_guide_type=_text(b"json")), vocab, NO_ROWS, 100)
    assert json["guided_decoding_guide_type"][0, 0] == b"json" and "guided_decoding_guide" not in json  # any JSON: no text
    regex = tensorrt_llm_inputs(_item(guided_decoding_guide_type=_text(b"regex"), guided_decoding_guide=_text("é+".encode())), vocab, NO_ROWS, 100)
    assert regex["guided_decoding_guide"][0, 0] == "é+".encode()


@pytest.mark.parametrize(
    "fields",
    [
        {"guide_type": "xml", "guide": "<a/>"},  # tensorrt_llm would ignore it silently (utils.cc guideTypeMapping)
        {"guide": "[a-z]+"},
        {"guide_type": "regex"},
        {"guide_type": "ebnf_grammar", "guide": ""},
        {"top_logprobs": 2},
        {"top_logprobs": 21, "logprobs": True},
    ],
)
def test_gpu_llm_step_refuses_bad_guides_and_top_logprobs_as_the_cpu_llm_does(tiny, fields):
    """The same message as SamplingParams.from_request gives the CPU llm (triton_repo/llm/1/model.py)."""
    vocab = ModelConfig.from_pretrained(tiny).text.vocab_size
    with pytest.raises(ValueError) as cpu:
        SamplingParams.from_request(8, **fields)
    names = {"guide_type": "guided_decoding_guide_type", "guide": "guided_decoding_guide", "logprobs": "return_log_probs"}
    item = _item(**{names.get(k, k): _text(v.encode()) if isinstance(v, str) else np.array([v]) for k, v in fields.items()})
    with pytest.raises(ValueError) as gpu:
        tensorrt_llm_inputs(item, vocab, NO_ROWS, 100)
    assert str(gpu.value) == str(cpu.value)


def test_gpu_llm_step_refuses_top_logprobs_it_cannot_return(tiny):
    vocab = ModelConfig.from_pretrained(tiny).text.vocab_size
    item = _item(return_log_probs=np.array([True]), top_logprobs=np.array([3], np.int32))
    message = r"^top_logprobs is not available on the GPU path: TensorRT-LLM's tensorrt_llm model returns only the chosen tokens' log probabilities"
    with pytest.raises(ValueError, match=message):
        tensorrt_llm_inputs(item, vocab, NO_ROWS, 100)
    with pytest.raises(ValueError, match=r"input 'guided_decoding_guide' is not valid UTF-8 \(byte 0"):
        tensorrt_llm_inputs(_item(guided_decoding_guide_type=_text(b"regex"), guided_decoding_guide=_text(b"\xff")), vocab, NO_ROWS, 100)


def _response(log_probs: list[float], beams: int = 1) -> dict[str, np.ndarray]:
    """A tensorrt_llm response's score outputs: output_log_probs [1, beams, N], cum_log_probs [1, beams]."""
    listed = np.array([log_probs] + [[-1.0] * len(log_probs)] * (beams - 1), np.float32)[None]
    return {"output_log_probs": listed, "cum_log_probs": np.array([[sum(log_probs)] * beams], np.float32)}


def test_streamed_log_probs_keep_only_each_responses_own_tokens():
    """Streaming: output_ids carry the new tokens, output_log_probs the whole reply so far
    (llmRequest.cpp createResult); one response may bring several tokens; the stream may end with a
    response of no new token."""
    lp = [-0.5, -0.25, -2.0, -0.125, -1.0]
    stream = [(_response(lp[:1]), 1), (_response(lp[:2], beams=2), 1), (_response(lp[:4]), 2), (_response(lp), 1), (_response(lp), 0)]
    scores, taken = ReplyScores(), []
    for tensors, new in stream:
        scores.add(tensors, new)
        taken.append(scores.take())
    assert [t["output_log_probs"].tolist() for t in taken] == [[-0.5], [-0.25], [-2.0, -0.125], [-1.0], []]
    assert [t["cum_log_probs"].tolist() for t in taken] == [[-0.5], [-0.75], [-2.875], [-3.875], [-3.875]]
    assert [t["top_log_probs"].shape for t in taken] == [(1, 0), (1, 0), (2, 0), (1, 0), (0, 0)]
    assert all(t["output_log_probs"].dtype == t["cum_log_probs"].dtype == t["top_log_probs"].dtype == np.float32 for t in taken)
    assert all(t["top_token_ids"].dtype == np.int32 and t["top_token_ids"].shape == t["top_log_probs"].shape for t in taken)


def test_log_probs_without_streaming_and_of_only_new_tokens():
    lp = [-0.5, -0.25, -2.0]
    scores = ReplyScores()
    scores.add(_response(lp), 3)  # one response, every token
    whole = scores.take()
    assert whole["output_log_probs"].tolist() == lp and whole["cum_log_probs"].tolist() == [-2.75]
    assert ReplyScores().take()["output_log_probs"].shape == (0,)  # nothing generated yet
    # a backend that sends only the new tokens' log probs (TensorRT-LLM's PyTorch backend since #8785)
    own, cum = response_log_probs({"output_log_probs": np.array([[[-2.0]]], np.float32), "cum_log_probs": np.array([[-2.75]], np.float32)}, 1, 2)
    assert own.tolist() == [-2.0] and cum == -2.75
    with pytest.raises(ValueError, match="tensorrt_llm sent 2 log probs for 3 new tokens after 1"):
        response_log_probs(_response([-1.0, -1.0]), 3, 1)
    with pytest.raises(ValueError, match="tensorrt_llm sent no output_log_probs"):
        response_log_probs({"output_ids": np.zeros((1, 1, 1), np.int32)}, 1, 0)


@pytest.fixture(scope="module")
def scoring_server(tiny, tmp_path_factory):
    """tritonserver with the generated GPU llm wrapper over tests/doubles/tensorrt_llm_scoring."""
    with serve_wrapper(tiny, tmp_path_factory.mktemp("gpu_guided"), "tensorrt_llm_scoring") as server:
        yield server


@pytest.mark.parametrize("streaming", [True, False])
def test_gpu_llm_wrapper_forwards_the_guide_and_returns_each_responses_log_probs(scoring_server, tiny, streaming):
    config = ModelConfig.from_pretrained(tiny)
    inputs = _llm_request(config, tiles=0, streaming=streaming, output_len=6)
    inputs |= {"guided_decoding_guide_type": np.array([[b"json_schema"]], dtype=object),
               "guided_decoding_guide": np.array([[SCHEMA.encode()]], dtype=object),
               "return_log_probs": np.array([[True]])}  # fmt: skip
    responses = _call_llm(scoring_server, inputs)
    assert [t for r in responses for t in r["output_ids"][0].tolist()] == [2, len(SCHEMA), 1, 1, 100, 101]
    expected = -np.arange(1, 7, dtype=np.float32) / 8
    assert len(responses) == (7 if streaming else 1)
    for r in responses:  # each response: its own tokens' log probs, and the sum so far
        assert r["output_log_probs"].shape == (1, len(r["output_ids"][0])) and r["top_log_probs"].shape == (1, len(r["output_ids"][0]), 0)
    got = np.concatenate([r["output_log_probs"][0] for r in responses])
    assert got.tolist() == expected.tolist()
    sums = [float(r["cum_log_probs"][0, 0]) for r in responses]
    assert sums == pytest.approx((np.cumsum(expected).tolist() + [expected.sum()]) if streaming else [expected.sum()])


def test_gpu_llm_wrapper_without_log_probs_sends_empty_scores_and_asks_for_none(scoring_server, tiny):
    config = ModelConfig.from_pretrained(tiny)
    responses = _call_llm(scoring_server, _llm_request(config, tiles=0, streaming=False, output_len=5))
    (response,) = responses
    assert response["output_ids"][0].tolist() == [0, -1, 0, 0, 100]  # no guide, no return_log_probs, no log-prob outputs asked
    assert response["output_log_probs"].shape == response["cum_log_probs"].shape == (1, 0)
    assert response["top_log_probs"].shape == response["top_token_ids"].shape == (1, 0, 0)
    bad = _llm_request(config, tiles=0, streaming=True) | {"return_log_probs": np.array([[True]]), "top_logprobs": np.array([[2]], np.int32)}
    with pytest.raises(Exception, match="top_logprobs is not available on the GPU path"):
        _call_llm(scoring_server, bad)
