"""`make build TARGET=gpu`, the parts that need no GPU: the generated repository (parses, wires the
same ensemble as the CPU target, places models, carries the engines' dtype and names), the llm
wrapper's requests against the tensorrt_llm config, and the leader-mode launch command."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2

from build.repository import TARGET_MODELS, TOKENIZER_INFO, gpu_values, write_repository, write_tokenizer_info
from build.settings import BuildSettings, GpuSettings
from build.trt_vision import default_profile, engine_metadata
from engine.config import ModelConfig
from engine.prompt import PromptBuilder
from engine.protocol import stop_words_list
from engine.sampling_params import MIN_TEMPERATURE
from engine.tokenizer import TextTokenizer
from engine.trtllm_request import (
    finish_reason,
    image_extra_id,
    request_extra_id,
    response_tokens,
    table_extra_ids,
    tensorrt_llm_inputs,
)
from launcher.gpu import server_command, world_size
from tests.repository_checks import assert_ensemble_wired, full_dims, metric_value, parse_configs

MODELS = TARGET_MODELS["gpu"]
TYPE = {"float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}


def write_gpu_repository(tiny, tmp_path, settings=BuildSettings(), gpu=GpuSettings()):
    config = ModelConfig.from_pretrained(tiny)
    metadata = engine_metadata(config, gpu.dtype, default_profile(config, settings), "10.14.1.48")
    values = gpu_values(config, settings, gpu, metadata, tmp_path / "llm" / "engine", write_tokenizer_info(config, tmp_path / "llm"))
    write_repository(tmp_path / "model_repository", "gpu", values)
    (tmp_path / "build.json").write_text(json.dumps({"target": "gpu", "values": values}))
    return config, parse_configs(tmp_path / "model_repository", MODELS)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_repository_parses_and_wires_the_ensemble(tiny, tmp_path, dtype):
    config, configs = write_gpu_repository(tiny, tmp_path, gpu=GpuSettings(dtype=dtype))
    assert_ensemble_wired(configs)
    for m in MODELS:
        assert "${" not in (tmp_path / "model_repository" / m / "config.pbtxt").read_text()
    table = {m: {t.name: t for t in configs[m].input} for m in ("llm", "tensorrt_llm")}
    # the prompt table crosses vision → llm → tensorrt_llm in the engines' dtype
    assert configs["vision_encoder"].output[0].data_type == table["llm"]["prompt_embedding_table"].data_type
    assert table["tensorrt_llm"]["prompt_embedding_table"].data_type == configs["vision_encoder"].output[0].data_type
    assert model_config_pb2.DataType.Name(configs["vision_encoder"].output[0].data_type) == TYPE[dtype]


def test_same_ensemble_and_pre_and_postprocessing_as_the_cpu_target(tiny, tmp_path):
    """The same models and wiring on both targets, but for one documented difference: on CPU the vision
    model decodes behind its feature cache (preprocess passes it the encoded images, VISION_DECODE_INPUTS),
    while the GPU preprocess decodes for the TensorRT plan (decodes_images)."""
    from build.repository import VISION_DECODE_INPUTS, build

    write_gpu_repository(tiny, tmp_path / "gpu")
    build(tiny, tmp_path / "cpu")
    cpu, gpu = (parse_configs(tmp_path / t / "model_repository", ["internvl", "preprocess", "postprocess", "llm"]) for t in ("cpu", "gpu"))
    assert cpu["postprocess"] == gpu["postprocess"]
    decodes = {target: c["preprocess"].parameters.pop("decodes_images").string_value for target, c in (("cpu", cpu), ("gpu", gpu))}
    assert decodes == {"cpu": "false", "gpu": "true"} and cpu["preprocess"] == gpu["preprocess"]
    for cpu_step, gpu_step in zip(cpu["internvl"].ensemble_scheduling.step, gpu["internvl"].ensemble_scheduling.step, strict=True):
        assert cpu_step.model_name == gpu_step.model_name
        cpu_only = set(VISION_DECODE_INPUTS) if cpu_step.model_name == "vision_encoder" else set()
        assert {k: v for k, v in cpu_step.input_map.items() if k not in cpu_only} == dict(gpu_step.input_map)
        cpu_only = set(VISION_DECODE_INPUTS) - {"image_keys"} if cpu_step.model_name == "preprocess" else set()
        assert {k: v for k, v in cpu_step.output_map.items() if k not in cpu_only} == dict(gpu_step.output_map)
    cpu_llm, gpu_llm = cpu["llm"], gpu["llm"]
    assert [(t.name, t.data_type) for t in cpu_llm.output] == [(t.name, t.data_type) for t in gpu_llm.output]
    # tile_tokens: InternVL3.5-Flash's per-tile token counts, served on the CPU target only (build_gpu refuses flash)
    assert {t.name for t in cpu_llm.input} - {"tile_tokens"} == {t.name for t in gpu_llm.input}


def test_vision_plan_model_batches_ragged_tiles_on_the_chosen_gpus(tiny, tmp_path):
    settings = BuildSettings(max_batch_size=4)
    config, configs = write_gpu_repository(tiny, tmp_path, settings, GpuSettings(vision_gpus=(0, 3), vision_instances=2))
    vision = configs["vision_encoder"]
    assert vision.platform == "tensorrt_plan" and vision.max_batch_size == 4
    (pixels,), (table,) = vision.input, vision.output
    assert (pixels.name, table.name) == ("pixel_values", "prompt_embedding_table")  # the engine's names (metadata)
    assert pixels.allow_ragged_batch and list(pixels.dims) == [-1, 3, 448, 448]
    assert list(table.dims) == [-1, config.vision.tokens_per_tile, config.text.hidden_size]
    (scatter,) = vision.batch_output
    assert list(scatter.target_name) == ["prompt_embedding_table"] and list(scatter.source_input) == ["pixel_values"]
    assert scatter.kind == scatter.BATCH_SCATTER_WITH_INPUT_SHAPE
    (group,) = vision.instance_group
    assert list(group.gpus) == [0, 3] and group.count == 2 and group.kind == group.KIND_GPU


def test_tensorrt_llm_model_settings_and_llm_placement(tiny, tmp_path):
    gpu = GpuSettings(tp_size=2, llm_gpus=(1, 2), batch_scheduler_policy="max_utilization", kv_cache_free_gpu_mem_fraction=0.7)
    settings = BuildSettings(llm_max_batch_size=6)
    config, configs = write_gpu_repository(tiny, tmp_path, settings, gpu)
    trtllm = configs["tensorrt_llm"]
    params = {k: v.string_value for k, v in trtllm.parameters.items()}
    assert trtllm.backend == "tensorrtllm" and trtllm.model_transaction_policy.decoupled
    assert trtllm.max_batch_size == 6
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["gpt_model_path"] == str((tmp_path / "llm" / "engine").resolve())
    assert params["batch_scheduler_policy"] == "max_utilization"
    assert float(params["kv_cache_free_gpu_mem_fraction"]) == 0.7
    assert params["enable_kv_cache_reuse"] == "true" and params["enable_chunked_context"] == "true"
    assert params["gpu_device_ids"] == "1,2"  # TP rank 0 on GPU 1, rank 1 on GPU 2; vision stays on GPU 0
    assert list(configs["vision_encoder"].instance_group[0].gpus) == [0]
    llm_params = {k: v.string_value for k, v in configs["llm"].parameters.items()}
    assert int(llm_params["max_seq_len"]) == settings.limits(config)["max_seq_len"]
    _, unplaced = write_gpu_repository(tiny, tmp_path / "default")
    assert "gpu_device_ids" not in unplaced["tensorrt_llm"].parameters


# Parameters the tensorrtllm backend reads with ModelState::GetParameter and no default: a missing key
# throws "Cannot find parameter with name" and the instance fails to load (NVIDIA/TensorRT-LLM
# triton_backend/inflight_batcher_llm/src/model_instance_state.cc: getBatchingTypeFromParams,
# getGuidedDecodingConfigFromParams, both called unconditionally from getExecutorConfigFromParams; the
# constructor's gpt_model_path read is guarded, but without it the load fails with "Both encoder and
# decoder model paths are empty"). docs/model_config.md calls the guided-decoding three optional.
BACKEND_REQUIRED_PARAMETERS = ("gpt_model_type", "gpt_model_path", "tokenizer_dir", "xgrammar_tokenizer_info_path", "guided_decoding_backend")


def test_defect_tensorrt_llm_model_fails_to_load_without_the_parameters_the_backend_requires(tiny, tmp_path):
    _, configs = write_gpu_repository(tiny, tmp_path)
    params = {k: v.string_value for k, v in configs["tensorrt_llm"].parameters.items()}
    missing = [p for p in BACKEND_REQUIRED_PARAMETERS if p not in params]
    assert not missing, f"the tensorrtllm backend would fail to load: no {missing}"
    assert params["gpt_model_type"] in ("V1", "v1", "inflight_batching", "inflight_fused_batching")
    assert params["gpt_model_path"]
    assert params["tokenizer_dir"] == ""  # the C++ backend does not read it (model_instance_state.cc)
    # numbers and bools the backend parses: an unparsable one is silently replaced by its default
    for key in ("kv_cache_free_gpu_mem_fraction", "max_beam_width"):
        float(params[key])
    for key in ("enable_kv_cache_reuse", "enable_chunked_context", "exclude_input_in_output"):
        assert params[key] in ("true", "false"), key


def test_llm_wrapper_requests_match_the_tensorrt_llm_config(tiny, tmp_path):
    """What the GPU llm model sends for a real two-image prompt is declared by tensorrt_llm with the
    same dtype and rank, every required input is there, and the extra ids mark exactly the image slots."""
    config, configs = write_gpu_repository(tiny, tmp_path)
    tokenizer = TextTokenizer(tiny)
    prompt = PromptBuilder(config, tokenizer).build("Image-1: <image>\nImage-2: <image>\nDescribe both pictures.", [5, 2], [], None)
    rows = 7 * config.vision.tokens_per_tile
    item = {
        "input_ids": prompt.input_ids,
        "input_lengths": np.array([len(prompt.input_ids)], np.int32),
        "request_output_len": np.array([64], np.int32),
        "end_id": np.array([config.stop_token_id], np.int32),
        "stop_words_list": stop_words_list(tokenizer, ["END"]),
        "streaming": np.array([True]),
        "temperature": np.array([0.7], np.float32),
        "runtime_top_k": np.array([20], np.int32),
        "seed": np.array([7], np.uint64),
        "min_tokens": np.array([3], np.int32),
        "repetition_penalty": np.array([1.1], np.float32),
    }
    row_ids = table_extra_ids(rows, config.vision.tokens_per_tile, ["key-a", "key-b"], np.array([5, 2]), b"request-1")
    sent = tensorrt_llm_inputs(item, config.text.vocab_size, row_ids, max_seq_len=100_000)
    trtllm = configs["tensorrt_llm"]
    declared = {t.name: t for t in trtllm.input}
    for name, value in sent.items():
        assert name in declared, name
        assert value.dtype == _numpy_dtype(declared[name].data_type), name
        assert value.ndim == len(full_dims(trtllm, declared[name])), name
        assert value.shape[0] == 1
    assert {t.name for t in trtllm.input if not t.optional} <= set(sent)
    extra = sent["prompt_table_extra_ids"][0]
    assert len(extra) == len(prompt.input_ids)  # the backend ignores them otherwise
    image_slots = prompt.input_ids >= config.text.vocab_size
    assert [int(x) for x in np.unique(extra[image_slots])] == sorted([image_extra_id("key-a"), image_extra_id("key-b")])
    assert not extra[~image_slots].any()
    assert sent["temperature"][0, 0] == np.float32(0.7) and sent["runtime_top_p"][0, 0] == 1.0  # full-vocabulary sampling
    assert sent["runtime_top_k"][0, 0] == 20 and sent["pad_id"][0, 0] == config.stop_token_id


@pytest.mark.parametrize("key", [2**63 + 5, 15121140756026053281, 2**64 - 1, 7])
def test_defect_image_keys_above_2_63_reach_tensorrt_llm_exactly(tiny, key):
    """Extra ids span uint64; half its values are ≥ 2**63, where np.where(mask, key, 0) went through
    float64 (rounded, or 0 for 2**64 - 1: the text marker) before the uint64 cast. The backend declares
    prompt_table_extra_ids TYPE_UINT64 and reads it with extractVector<uint64_t> (TensorRT-LLM
    triton_backend/inflight_batcher_llm/src/utils.cc)."""
    import warnings

    vocab = ModelConfig.from_pretrained(tiny).text.vocab_size
    ids = np.array([1, vocab, vocab + 1, 2], np.int32)
    item = {"input_ids": ids, "input_lengths": np.array([4], np.int32), "request_output_len": np.array([5], np.int32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extra = tensorrt_llm_inputs(item, vocab, np.full(2, key, np.uint64), max_seq_len=100)["prompt_table_extra_ids"][0]
    assert extra.dtype == np.uint64 and [int(x) for x in extra] == [0, key, key, 0]


TWO_ROWS, NO_ROWS = np.full(2, 9, np.uint64), np.zeros(0, np.uint64)  # prompt-table rows' extra ids


def test_llm_wrapper_request_semantics(tiny):
    config = ModelConfig.from_pretrained(tiny)
    vocab = config.text.vocab_size
    ids = np.array([1, 2, vocab, vocab + 1, 3], np.int32)
    base = {"input_ids": ids, "input_lengths": np.array([5], np.int32), "request_output_len": np.array([15], np.int32)}
    greedy = tensorrt_llm_inputs({**base, "runtime_top_k": np.array([40], np.int32)}, vocab, TWO_ROWS, max_seq_len=20)
    assert greedy["runtime_top_k"][0, 0] == 1 and "temperature" not in greedy  # no temperature: greedy, as on CPU
    assert greedy["request_output_len"][0, 0] == 15
    assert greedy["exclude_input_in_output"][0, 0] and not greedy["streaming"][0, 0]
    # absent: the rest of the context, as on CPU; more than that is refused, not cut
    unset = {k: v for k, v in base.items() if k != "request_output_len"}
    assert tensorrt_llm_inputs(unset, vocab, TWO_ROWS, 20)["request_output_len"][0, 0] == 15
    with pytest.raises(ValueError, match=r"max_tokens \+ the prompt's 5 tokens must fit this deployment's context of 20 tokens \(at most 15 new tokens\), got 16"):
        tensorrt_llm_inputs({**base, "request_output_len": np.array([16], np.int32)}, vocab, TWO_ROWS, 20)
    assert "prompt_table_extra_ids" not in tensorrt_llm_inputs({**base, "input_ids": ids.clip(max=5)}, vocab, NO_ROWS, 20)
    with pytest.raises(ValueError, match="2 image-token slots but the prompt table has 3 rows"):
        tensorrt_llm_inputs(base, vocab, np.full(3, 9, np.uint64), 20)
    with pytest.raises(ValueError, match="does not match the 5 input_ids"):
        tensorrt_llm_inputs({**base, "input_lengths": np.array([4], np.int32)}, vocab, TWO_ROWS, 20)
    with pytest.raises(ValueError, match="the prompt has 5 tokens; this deployment's context is 5"):
        tensorrt_llm_inputs(base, vocab, TWO_ROWS, 5)
    with pytest.raises(ValueError, match="max_tokens must be ≥ 1"):
        tensorrt_llm_inputs({**base, "request_output_len": np.array([0], np.int32)}, vocab, TWO_ROWS, 20)
    assert (finish_reason(15, 15), finish_reason(3, 15)) == ("length", "stop")
    # responses: [1, beams, N] padded; sequence_length says how many are real
    assert response_tokens(np.array([[[5, 6, -1]]], np.int32), np.array([[2]], np.int32)).tolist() == [5, 6]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", np.float32(-1), r"^temperature must be ≥ 0 \(0 = greedy\), got -1$"),
        ("runtime_top_p", np.float32(2), r"^top_p must be in \[0, 1\] \(0 = off\), got 2$"),
        ("repetition_penalty", np.float32(1e-38), r"^repetition_penalty must be in \[0.001, 1000\] \(1 = off\), got 1e-38$"),
        ("end_id", np.int32(10**6), r"^stop token id 1000000 is not in the vocabulary \[0, \d+\)$"),
    ],
)
def test_gpu_llm_step_refuses_what_the_cpu_llm_refuses(tiny, field, value, message):
    """Same rules, same one-line message on both targets (engine/sampling_params.py)."""
    vocab = ModelConfig.from_pretrained(tiny).text.vocab_size
    item = {"input_ids": np.array([1, 2, 3], np.int32), "input_lengths": np.array([3], np.int32),
            "request_output_len": np.array([8], np.int32), field: np.array([value])}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        tensorrt_llm_inputs(item, vocab, NO_ROWS, 100)


def test_gpu_llm_step_sends_tiny_temperatures_as_the_cpu_engine_samples_them(tiny):
    vocab = ModelConfig.from_pretrained(tiny).text.vocab_size
    item = {"input_ids": np.array([1, 2, 3], np.int32), "input_lengths": np.array([3], np.int32),
            "request_output_len": np.array([8], np.int32), "temperature": np.array([1e-38], np.float32)}  # fmt: skip
    assert tensorrt_llm_inputs(item, vocab, NO_ROWS, 100)["temperature"][0, 0] == np.float32(MIN_TEMPERATURE)


def test_vision_plan_and_llm_engine_must_agree(tiny, tmp_path):
    config = ModelConfig.from_pretrained(tiny)
    settings = BuildSettings()
    metadata = engine_metadata(config, "float16", default_profile(config, settings), "10.14.1.48")
    with pytest.raises(ValueError, match="the prompt table needs one dtype"):
        gpu_values(config, settings, GpuSettings(dtype="bfloat16"), metadata, tmp_path, tmp_path / TOKENIZER_INFO)
    with pytest.raises(ValueError, match="rebuild it"):
        gpu_values(config, BuildSettings(max_batch_size=16), GpuSettings(), metadata, tmp_path, tmp_path / TOKENIZER_INFO)
    wrong = {**metadata, "output": {**metadata["output"], "shape": [-1, 64, config.text.hidden_size]}}
    with pytest.raises(ValueError, match="this checkpoint needs"):
        gpu_values(config, settings, GpuSettings(), wrong, tmp_path, tmp_path / TOKENIZER_INFO)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tp_size": 2, "llm_gpus": (1,)}, "one GPU per rank"),
        ({"llm_gpus": (1, 1), "tp_size": 2}, "repeats a GPU"),
        ({"dtype": "float32"}, "dtype must be one of"),
        ({"quantization": "int3"}, "quantization must be one of"),
        ({"vision_gpus": ()}, "vision_gpus must list GPU ids"),
        ({"kv_cache_free_gpu_mem_fraction": 1.5}, r"must be in \(0, 1\)"),
    ],
)
def test_gpu_settings_refuse_inconsistent_placement(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GpuSettings(**kwargs)


def test_launch_command_follows_tensorrt_llm_leader_mode(tiny, tmp_path):
    write_gpu_repository(tiny, tmp_path, gpu=GpuSettings(tp_size=2, pp_size=2))
    assert world_size(tmp_path) == 4
    command = server_command(tmp_path, 4, 8000, 8001, 8002, "tritonserver")
    assert command[:2] == ["mpirun", "--allow-run-as-root"]
    ranks = " ".join(command[2:]).split(" : ")
    assert len(ranks) == 4
    repository = f"--model-repository={(tmp_path / 'model_repository').resolve()}"
    for rank, part in enumerate(ranks):
        args = part.split()
        assert args[:3] == ["-n", "1", "tritonserver"] and repository in args
        assert f"--backend-config=python,shm-region-prefix-name=prefix{rank}_" in args
        assert "--disable-auto-complete-config" in args
        assert ("--load-model=tensorrt_llm" in args) == (rank > 0) == ("--model-control-mode=explicit" in args)
    single = server_command(tmp_path, 1, 8000, 8001, 8002, "tritonserver")
    assert single[0] == "tritonserver" and "mpirun" not in single


def test_launcher_refuses_a_cpu_build(tiny, tmp_path):
    from build.repository import build

    build(tiny, tmp_path)
    with pytest.raises(ValueError, match="holds no GPU build"):
        world_size(tmp_path)


def _numpy_dtype(data_type: int) -> np.dtype:
    """TYPE_STRING (Triton's BYTES): numpy object arrays of bytes, as tritonclient and pb_utils send them."""
    from tritonclient.utils import triton_to_np_dtype

    name = model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")
    return np.dtype(triton_to_np_dtype("BYTES" if name == "STRING" else name))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_gpu_build_without_the_toolchain_stops_before_any_work(tiny, tmp_path):
    from build.repository import build_gpu

    with pytest.raises(RuntimeError, match="not installed: build the GPU path inside the TensorRT-LLM Triton container"):
        build_gpu(tiny, tmp_path, BuildSettings(), GpuSettings())
    assert not any(tmp_path.iterdir())


@contextlib.contextmanager
def serve_wrapper(tiny, out, double: str):
    """tritonserver with the generated GPU llm wrapper and, in place of the GPU-only tensorrtllm
    backend, the python model tests/doubles/<double> under the generated tensorrt_llm config."""
    import shutil

    from launcher.server import TritonServer, free_port

    write_gpu_repository(tiny, out)
    repository = out / "model_repository"
    for model in ("internvl", "vision_encoder", "preprocess", "postprocess"):
        shutil.rmtree(repository / model)
    config = repository / "tensorrt_llm" / "config.pbtxt"
    config.write_text(config.read_text().replace('backend: "tensorrtllm"', 'backend: "python"'))
    shutil.copy2(Path(__file__).parent / "doubles" / double / "model.py", repository / "tensorrt_llm" / "1" / "model.py")
    with TritonServer(out, free_port(), free_port(), free_port(), log_file=out / "tritonserver.log") as server:
        yield server


@pytest.fixture(scope="module")
def wrapper_server(tiny, tmp_path_factory):
    with serve_wrapper(tiny, tmp_path_factory.mktemp("gpu_wrapper"), "tensorrt_llm") as server:
        yield server


def _call_llm(server, inputs: dict[str, np.ndarray]) -> list[dict]:
    """Streams one request to the llm model over gRPC; -> its responses as dicts of arrays."""
    import queue

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    received: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: received.put(error or result))
    tensors = []
    for name, value in inputs.items():
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    client.async_stream_infer("llm", tensors, enable_empty_final_response=True)
    responses = []
    while True:
        result = received.get(timeout=60)
        if isinstance(result, Exception):
            client.stop_stream()
            raise result
        final = result.get_response().parameters["triton_final_response"].bool_param
        if result.get_response().outputs:
            responses.append({o.name: result.as_numpy(o.name) for o in result.get_response().outputs})
        if final:
            break
    client.stop_stream()
    return responses


def _llm_request(config, tiles: int, streaming: bool, output_len: int = 8) -> dict[str, np.ndarray]:
    q, h, vocab = config.vision.tokens_per_tile, config.text.hidden_size, config.text.vocab_size
    ids = np.array([[5, 6, *range(vocab, vocab + tiles * q), 7]], np.int32)
    inputs = {
        "input_ids": ids,
        "input_lengths": np.array([[ids.shape[1]]], np.int32),
        "request_output_len": np.array([[output_len]], np.int32),
        "end_id": np.array([[config.stop_token_id]], np.int32),
        "streaming": np.array([[streaming]]),
        "request_key": np.array([[b"key-%d" % tiles]], dtype=object),
        "stop_words_list": np.array([[[9, 0], [1, -1]]], np.int32),
    }
    if tiles:
        inputs["prompt_embedding_table"] = np.ones((1, tiles, q, h), np.float16)
    return inputs


@pytest.mark.parametrize("streaming", [True, False])
def test_gpu_llm_wrapper_through_tritonserver(wrapper_server, tiny, streaming):
    """The wrapper's Triton mechanics on the real python backend: decoupled BLS to tensorrt_llm, the
    [1, T, Q, H] table flattened through DLPack, extra ids on exactly the image slots, one
    response per token when streaming (one in all otherwise), is_final on the last, echoes."""
    config = ModelConfig.from_pretrained(tiny)
    q = config.vision.tokens_per_tile
    responses = _call_llm(wrapper_server, _llm_request(config, tiles=2, streaming=streaming))
    tokens = [t for r in responses for t in r["output_ids"][0].tolist()]
    assert tokens == [2 * q, 2 * q, 1, 2 * q + 3, 1, request_extra_id(b"key-2") & 0x7FFFFFFF, 100, 101]
    assert [bool(r["is_final"][0, 0]) for r in responses] == [False] * (len(responses) - 1) + [True]
    assert len(responses) == (9 if streaming else 1)  # streaming ends with an empty is_final response
    assert [r["finish_reason"][0, 0] for r in responses] == [b""] * (len(responses) - 1) + [b"length"]
    assert all(r["prompt_tokens"][0, 0] == 3 + 2 * q for r in responses)
    for r in responses:
        assert r["request_key"][0, 0] == b"key-2" and r["stop_words_list"][0].tolist() == [[9, 0], [1, -1]]
        assert r["sequence_length"][0, 0] == len(r["output_ids"][0])


def test_gpu_llm_wrapper_keys_image_rows_by_content_across_requests(wrapper_server, tiny):
    """prompt_table_extra_ids from image_keys / image_tiles: an image gets the same id in every request
    (TensorRT-LLM then reuses its KV blocks across requests), another image another id; without
    image_keys each request gets its own id (no reuse across requests)."""
    config = ModelConfig.from_pretrained(tiny)

    def sent_ids(request_key: bytes, keys: list[bytes] | None, tiles: list[int] | None = None) -> tuple[int, int]:
        """-> (distinct extra ids, the first image slot's id & 0x7FFFFFFF) that reached tensorrt_llm."""
        inputs = _llm_request(config, tiles=2, streaming=False)
        inputs["request_key"] = np.array([[request_key]], dtype=object)
        if keys is not None:
            inputs["image_keys"] = np.array([keys], dtype=object)
            inputs["image_tiles"] = np.array([tiles or [1] * len(keys)], np.int32)
        tokens = _call_llm(wrapper_server, inputs)[0]["output_ids"][0].tolist()
        return tokens[2], tokens[5]

    low = 0x7FFFFFFF
    assert sent_ids(b"r1", [b"A", b"B"]) == (2, image_extra_id("A") & low) == sent_ids(b"r2", [b"A", b"C"])
    assert sent_ids(b"r3", [b"B", b"A"]) == (2, image_extra_id("B") & low)
    assert sent_ids(b"r4", [b"A", b"A"]) == (1, image_extra_id("A") & low)
    assert sent_ids(b"r5", [b"A"], [2]) == (1, image_extra_id("A") & low)  # one image of two tiles
    assert sent_ids(b"r6", None) == (1, request_extra_id(b"r6") & low) != sent_ids(b"r7", None)
    with pytest.raises(Exception, match="image_keys has 2 keys but image_tiles 1 tile counts"):
        sent_ids(b"r8", [b"A", b"B"], [1])
    with pytest.raises(Exception, match=r"image_tiles \[1\] × 256 tokens do not cover the prompt table's 512 rows"):
        sent_ids(b"r9", [b"A"], [1])


def test_gpu_llm_wrapper_stop_request_ends_the_stream_with_that_request_id(wrapper_server, tiny):
    """A client that goes away sends the llm a `stop` request with its request id (engine/protocol.py
    stop_request): the wrapper cancels its BLS stream to tensorrt_llm and ends the request, and counts
    it as the CPU llm does (internvl_llm_requests_in_flight, internvl_llm_aborted_total)."""
    import queue
    import threading

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    from engine.protocol import stop_request

    def tensors(inputs):
        out = []
        for name, value in inputs:
            tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value)
            out.append(tensor)
        return out

    config = ModelConfig.from_pretrained(tiny)
    received: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(wrapper_server.grpc_url)
    client.start_stream(callback=lambda result, error: received.put(error or result))
    long = _llm_request(config, tiles=0, streaming=True, output_len=2000)
    client.async_stream_infer("llm", tensors(long.items()), request_id="to-stop", enable_empty_final_response=True)
    aborted = metric_value(wrapper_server, "internvl_llm_aborted_total")
    for _ in range(3):
        assert received.get(timeout=60).get_response().outputs
    assert metric_value(wrapper_server, "internvl_llm_requests_in_flight") == 1
    model, inputs, request_id = stop_request("to-stop")
    stopper = grpcclient.InferenceServerClient(wrapper_server.grpc_url)
    stopped = threading.Event()
    stopper.start_stream(callback=lambda result, error: stopped.set())
    stopper.async_stream_infer(model, tensors((n, v) for n, _, v in inputs), request_id=request_id, enable_empty_final_response=True)
    assert stopped.wait(10)
    tokens, error = 3, None
    while True:
        result = received.get(timeout=10)
        if isinstance(result, Exception):
            error = result.message()
            break
        tokens += bool(result.get_response().outputs)
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    stopper.stop_stream()
    assert tokens < 1000  # ended long before its 2000 tokens (20 s at the double's pace)
    deadline = time.monotonic() + 5
    while metric_value(wrapper_server, "internvl_llm_requests_in_flight") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric_value(wrapper_server, "internvl_llm_requests_in_flight") == 0
    assert metric_value(wrapper_server, "internvl_llm_aborted_total") == aborted + 1
    # The BLS ResponseIterator.cancel() the wrapper calls came with python_backend #398 (2025-04, Triton
    # 25.05); the GPU container (26.04) has it, the CPU machines' Triton 2.51 (24.10) does not.
    assert error is None or "ResponseIterator' object has no attribute 'cancel'" in error, error


def test_gpu_llm_wrapper_text_only_and_bad_requests(wrapper_server, tiny):
    config = ModelConfig.from_pretrained(tiny)
    responses = _call_llm(wrapper_server, _llm_request(config, tiles=0, streaming=False, output_len=5))
    assert responses[0]["output_ids"][0].tolist() == [0, 0, 0, 3, 1]  # no table, no extra ids
    bad = _llm_request(config, tiles=2, streaming=False)
    bad["prompt_embedding_table"] = bad["prompt_embedding_table"][:, :1]  # one tile short of the slots
    with pytest.raises(Exception, match="image-token slots but the prompt table has"):
        _call_llm(wrapper_server, bad)
    assert _call_llm(wrapper_server, _llm_request(config, tiles=1, streaming=False))  # still serving


def test_a_restarted_gpu_container_reuses_engines_built_for_the_same_checkpoint_settings_and_toolchain(tiny, tmp_path, monkeypatch):
    """Dockerfile.gpu builds at every start: with the same checkpoint, engine settings and TensorRT /
    TensorRT-LLM versions the plan and the engines are reused; any of them changed rebuilds both."""
    import importlib
    import sys
    import types

    from build import repository
    from build.trt_vision import METADATA, PLAN

    builds = []
    versions = {"tensorrt": "10.14.1.48", "tensorrt_llm": "1.2.1"}
    for name in versions:
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(__version__=versions[name]))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())

    def fake_plan(config, out, settings, dtype):
        out.mkdir(parents=True, exist_ok=True)
        metadata = engine_metadata(config, dtype, default_profile(config, settings), versions["tensorrt"], {"plan_bytes": 1, "device_memory_bytes": 1})
        (out / METADATA).write_text(json.dumps(metadata))
        (out / PLAN).write_bytes(b"plan")
        builds.append("plan")
        return out / PLAN

    def fake_engine(checkpoint, out, settings, gpu):
        (out / "engine").mkdir(parents=True, exist_ok=True)
        (out / "engine" / "rank0.engine").write_bytes(b"engine")
        builds.append("engine")
        return out / "engine"

    monkeypatch.setattr(repository, "build_vision_plan", fake_plan)
    monkeypatch.setattr(repository, "build_llm_engine", fake_engine)
    monkeypatch.setattr(repository, "_kv_cache_fraction", lambda gpu, metadata, engine_dir: gpu.kv_cache_free_gpu_mem_fraction)
    gpu = GpuSettings(vision_gpus=(1,))
    repository.build_gpu(tiny, tmp_path, BuildSettings(), gpu)
    assert builds == ["plan", "engine"]
    repository.build_gpu(tiny, tmp_path, BuildSettings(preprocess_instances=3), gpu)  # Triton-side only: reused
    assert builds == ["plan", "engine"]
    assert (tmp_path / "model_repository" / "vision_encoder" / "1" / "model.plan").read_bytes() == b"plan"
    repository.build_gpu(tiny, tmp_path, BuildSettings(max_images=1), gpu)  # the engine's limits changed
    assert builds == ["plan", "engine"] * 2
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", "10.14.2.1")  # a container with another TensorRT patch
    repository.build_gpu(tiny, tmp_path, BuildSettings(max_images=1), gpu)
    assert builds == ["plan", "engine"] * 3


def test_guided_decoding_is_set_up_with_the_tokenizer_info_the_backend_reads(tiny, tmp_path):
    """getGuidedDecodingConfigFromParams (model_instance_state.cc): backend "xgrammar" (anything else
    throws), the info path must exist, and its JSON must hold encoded_vocab (strings), tokenizer_str and
    stop_token_ids (nlohmann get<> of those three keys); the GuidedDecoder detects the vocabulary type
    from tokenizer_str. Checked here the way xgrammar itself builds its tables from them."""
    from engine.llm.guided import GuideCompiler

    config, configs = write_gpu_repository(tiny, tmp_path)
    params = {k: v.string_value for k, v in configs["tensorrt_llm"].parameters.items()}
    assert params["guided_decoding_backend"] == "xgrammar"
    info_path = Path(params["xgrammar_tokenizer_info_path"])
    assert info_path.is_absolute() and info_path.is_file() and info_path.name == TOKENIZER_INFO
    info = json.loads(info_path.read_text())
    assert set(info) == {"encoded_vocab", "tokenizer_str", "stop_token_ids"}
    assert all(isinstance(token, str) for token in info["encoded_vocab"]) and info["stop_token_ids"] == [config.stop_token_id]
    assert len(info["encoded_vocab"]) <= config.text.vocab_size
    vocab = json.loads(info["tokenizer_str"])["model"]["vocab"]
    assert all(info["encoded_vocab"][index] == token for token, index in vocab.items())
    compiled = GuideCompiler(lambda: info, config.text.vocab_size).compile("regex", "[a-z]{3}")  # the tables build
    assert compiled is not None
