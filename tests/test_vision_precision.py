"""vision_precision="int8" (engine/vision_precision.py) against the float32 vision graph on the tiny
checkpoints, and its plumbing: the cached int8 graph, `make build --vision-precision`, the refusals.

Gates. Features: cosine ≥ 0.999 per tile against the float32 graph (measured minimum 0.999854 on
these tiles, max |Δ| 2.4e-2 at max |feature| 1.4; at the InternViT-300M shape: docs/PERFORMANCE.md).
Greedy replies: the int8 features move the tiny LLMs' logits by up to ≈0.1 (of ≈20: these
checkpoints are built to be input-sensitive), and along some greedy paths the fp32 top-1/top-2
margin is narrower than that, so a reply can flip there (7 of 36 image × prompt × family cases at
24 tokens, qwen2/qwen3/llama, in a probe). Where every step's fp32 margin
exceeds twice that step's measured logit change no flip is possible: there the int8 Pipeline's reply
must equal the fp32 one, for at least two images and two prompts whose fp32 replies depend on the image.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from build.repository import build, build_gpu
from build.settings import BuildSettings, GpuSettings
from client.synthetic import synthetic_image
from client.triton_client import InternVLClient
from engine import vision_export
from engine.config import ModelConfig
from engine.llm.model import SequenceInput
from engine.pipeline import Pipeline
from engine.preprocess import load_images
from engine.vision import OnnxVisionEncoder, default_onnx_path, load_vision_encoder
from engine.vision_precision import VISION_PRECISIONS, quantization_stamp
from launcher.server import TritonServer, free_port
from tests.pipelines import pipelines  # noqa: F401 (fixture)

MIN_COSINE = 0.999
NEW_TOKENS = 16
SAMPLE = Path(__file__).resolve().parents[1] / "client" / "samples" / "lake_house.jpg"
IMAGES = {"lake_house": SAMPLE.read_bytes(), **{f"synthetic-{s}": synthetic_image(s, 640, 360, "JPEG") for s in (1, 2, 3, 4, 5)}}
PROMPTS = ("Describe the image.", "What is in the picture? Answer briefly.", "What colour dominates?", "Is it day or night?")


@pytest.fixture(scope="module")
def int8_pipelines(checkpoints):
    made: dict[str, Pipeline] = {}

    def get(family: str) -> Pipeline:
        if family not in made:
            made[family] = Pipeline.from_pretrained(checkpoints[family], vision_precision="int8")
        return made[family]

    yield get
    for pipe in made.values():
        pipe.close()


def _cosines(a: np.ndarray, b: np.ndarray, tiles: int) -> np.ndarray:
    a, b = a.reshape(tiles, -1).astype(np.float64), b.reshape(tiles, -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])  # llama's tiny tower is qwen3's (same seed)
def test_int8_features_keep_cosine_above_the_gate_per_tile(family, checkpoints):
    path = checkpoints[family]
    int8_file = vision_export.ensure_vision_onnx(path, log=lambda message: None, precision="int8")
    assert int8_file == default_onnx_path(path).with_name("vision_encoder.int8.onnx")
    photos, _ = load_images([IMAGES["lake_house"], IMAGES["synthetic-1"]], max_num=6, normalize=False)
    noise = np.random.default_rng(0).integers(0, 256, (2, 3, 448, 448), dtype=np.uint8)
    tiles = np.concatenate([photos, noise])
    fp32 = OnnxVisionEncoder(default_onnx_path(path)).encode(tiles)
    int8 = OnnxVisionEncoder(int8_file).encode(tiles)
    cosines = _cosines(fp32, int8, len(tiles))
    assert cosines.min() >= MIN_COSINE, f"per-tile cosines {np.round(cosines, 6)}"
    assert not np.array_equal(fp32, int8)  # the quantized graph is really the one loaded


def test_int8_features_of_a_request_do_not_depend_on_its_batch(checkpoints):
    """The int8 graph quantizes activations with one scale per run; one tile per run (TILES_PER_RUN)
    keeps a request's features the same alone and in a Triton batch with other requests."""
    int8_file = vision_export.ensure_vision_onnx(checkpoints["qwen3"], log=lambda message: None, precision="int8")
    rng = np.random.default_rng(5)
    request, other = (rng.integers(0, 256, (n, 3, 448, 448), dtype=np.uint8) for n in (2, 3))
    other[:, 0] = 255  # a brighter neighbour: a batch-wide scale would shift the request's features
    for encoder, same in ((OnnxVisionEncoder(int8_file), True), (OnnxVisionEncoder(int8_file, tiles_per_run=None), False)):
        alone = encoder.encode_request(request)[0]
        batched = encoder.encode_requests([request, other])[0][0]
        assert np.array_equal(alone, batched) is same


def _teacher_forced_logits(model, input_ids, table: np.ndarray, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: the logits that chose each of `tokens`, fed the given prompt table."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    cache = model.new_cache(len(ids) + len(tokens))
    logits, start, new = [], 0, ids
    for token in tokens:
        logits.append(model.forward([SequenceInput(new, start, cache, torch.as_tensor(table))])[0])
        start, new = start + len(new), torch.tensor([token])
    return torch.stack(logits)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_greedy_replies_equal_fp32_wherever_the_margins_rule_out_a_flip(family, checkpoints, pipelines, int8_pipelines):  # noqa: F811
    fp32, int8 = pipelines(checkpoints[family], "onnxruntime"), int8_pipelines(family)
    replies: dict[str, set[str]] = {}  # prompt -> the fp32 replies to the images
    checked: list[tuple[str, str]] = []  # (prompt, image)
    for question in PROMPTS:
        for name, image in IMAGES.items():
            reference = fp32.generate(question, [image], max_new_tokens=NEW_TOKENS)
            replies.setdefault(question, set()).add(reference.text)
            assert len(reference.token_ids) == NEW_TOKENS  # the tiny checkpoints never pick the stop token
            ours, theirs = fp32.prepare(question, [image]), int8.prepare(question, [image])
            assert np.array_equal(ours.prompt.input_ids, theirs.prompt.input_ids)
            assert not np.array_equal(ours.features.table, theirs.features.table)  # int8 features reach the LLM
            a = _teacher_forced_logits(fp32.llm.model, ours.prompt.input_ids, ours.features.table, reference.token_ids)
            b = _teacher_forced_logits(fp32.llm.model, ours.prompt.input_ids, theirs.features.table, reference.token_ids)
            top = a.topk(2).values
            if not bool((top[:, 0] - top[:, 1] > 2 * (a - b).abs().amax(1)).all()):
                continue  # some step's margin is within reach of the logit change: a flip is possible
            reply = int8.generate(question, [image], max_new_tokens=NEW_TOKENS)
            assert (reply.token_ids, reply.text) == (reference.token_ids, reference.text), (question, name)
            checked.append((question, name))
    prompts, images = {q for q, _ in checked}, {name for _, name in checked}
    assert len(prompts) >= 2 and len(images) >= 2, f"too few cases with margins above the bound: {checked}"
    # input sensitivity: for each prompt checked, the fp32 reply depends on the image
    assert all(len(replies[q]) >= 2 for q in prompts), replies


def test_the_served_vision_model_runs_the_int8_graph_the_build_chose(checkpoints, pipelines, int8_pipelines, tmp_path):  # noqa: F811
    """A case whose int8 reply differs from the fp32 one (a narrow margin flips): the server gives the int8 one."""
    fp32, int8 = pipelines(checkpoints["qwen3"], "onnxruntime"), int8_pipelines("qwen3")
    cases = [(q, image) for q in PROMPTS for image in IMAGES.values()]
    replies = ((q, image, int8.chat(q, [image], max_new_tokens=24)) for q, image in cases)
    question, image, expected = next((q, i, r) for q, i, r in replies if r != fp32.chat(q, [i], max_new_tokens=24))
    build(checkpoints["qwen3"], tmp_path, BuildSettings(max_images=1, vision_precision="int8"))
    with TritonServer(tmp_path, free_port(), free_port(), free_port(), log_file=tmp_path / "tritonserver.log") as server:
        assert InternVLClient(server.grpc_url).chat(question, [image], max_tokens=24) == expected


def test_int8_graph_is_cached_under_its_own_stamp_and_reused(tiny, tmp_path, monkeypatch):
    """A read-only checkpoint: both graphs go to the per-user cache, in folders keyed by their stamps."""
    store = shutil.copytree(tiny, tmp_path / "ckpt", ignore=shutil.ignore_patterns("onnx"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    writable = os.access
    monkeypatch.setattr(vision_export.os, "access", lambda p, mode: False if str(p).startswith(str(store)) and mode & os.W_OK else writable(p, mode))
    messages: list[str] = []
    int8_file = vision_export.ensure_vision_onnx(store, log=messages.append, precision="int8")
    fp32_file = vision_export.ensure_vision_onnx(store, log=messages.append)
    assert int8_file.name == "vision_encoder.int8.onnx" and fp32_file.name == "vision_encoder.onnx"
    assert int8_file.parent != fp32_file.parent and int8_file.parent.parent == fp32_file.parent.parent
    stamp = json.loads(int8_file.with_suffix(".stamp.json").read_text())
    assert stamp["quantization"] == quantization_stamp() and stamp == vision_export.vision_stamp(store, "int8")
    assert [m.split(" ")[0] for m in messages] == ["exporting", "exported", "quantizing", "quantized"]
    assert vision_export.ensure_vision_onnx(store, log=messages.append, precision="int8") == int8_file
    assert len(messages) == 4  # reused: nothing made again


def test_int8_of_an_export_with_external_data_keeps_its_weights_beside_it(tiny, tmp_path, monkeypatch):
    """The > 1.8 GB case (InternViT-6B), forced on the tiny checkpoint."""
    monkeypatch.setattr(vision_export, "EXTERNAL_DATA_BYTES", 0)
    fp32_file = vision_export.export_vision_onnx(tiny, tmp_path / "fp32" / "vision_encoder.onnx")
    assert Path(f"{fp32_file}.data").is_file()
    int8_file = vision_export.quantize_vision_onnx(fp32_file, tmp_path / "vision_encoder.int8.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32", "vision_encoder.int8.onnx", "vision_encoder.int8.onnx.data"]
    tiles = np.random.default_rng(1).integers(0, 256, (1, 3, 448, 448), dtype=np.uint8)
    cosine = _cosines(OnnxVisionEncoder(fp32_file).encode(tiles), OnnxVisionEncoder(int8_file).encode(tiles), 1)
    assert cosine.min() >= MIN_COSINE


def test_build_serves_the_graph_of_the_chosen_precision(tiny, tmp_path, capsys):
    build(tiny, tmp_path, BuildSettings(vision_precision="int8"))
    params = (tmp_path / "model_repository" / "vision_encoder" / "config.pbtxt").read_text()
    assert f'key: "onnx_file" value: {{ string_value: "{tmp_path / "vision_encoder.int8.onnx"}" }}' in params
    assert "exporting" in capsys.readouterr().out
    build(tiny, tmp_path, BuildSettings(vision_precision="int8"))
    assert "up to date" in capsys.readouterr().out
    build(tiny, tmp_path)  # back to float32: the export kept in OUT is still current
    out = capsys.readouterr().out
    assert "up to date" in out and "exporting" not in out
    params = (tmp_path / "model_repository" / "vision_encoder" / "config.pbtxt").read_text()
    assert f'string_value: "{tmp_path / "vision_encoder.onnx"}"' in params
    assert json.loads((tmp_path / "build.json").read_text())["values"]["vision_precision"] == "float32"


def test_unknown_precisions_and_other_runtimes_are_refused(tiny):
    assert VISION_PRECISIONS == ("float32", "int8") and BuildSettings().vision_precision == "float32"
    with pytest.raises(ValueError, match=r"vision_precision must be one of \('float32', 'int8'\), got 'int4'"):
        BuildSettings(vision_precision="int4")
    with pytest.raises(ValueError, match="vision_precision must be one of"):
        Pipeline.from_pretrained(tiny, vision_precision="float16")
    config = ModelConfig.from_pretrained(tiny)
    with pytest.raises(ValueError, match="vision_backend='onnxruntime' without vision_onnx"):
        load_vision_encoder(config, "torch", precision="int8")
    with pytest.raises(ValueError, match="vision_backend='onnxruntime' without vision_onnx"):
        load_vision_encoder(config, "onnxruntime", default_onnx_path(tiny), precision="int8")


def test_the_gpu_build_refuses_int8_before_any_work(tiny, tmp_path):
    with pytest.raises(ValueError, match="GPU path builds its TensorRT vision plan in --dtype"):
        build_gpu(tiny, tmp_path, BuildSettings(vision_precision="int8"), GpuSettings())
    assert not any(tmp_path.iterdir())
