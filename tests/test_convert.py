"""`python -m build.convert`: a custom-format checkpoint as an HF-native one that transformers loads
and that answers as the custom model.chat() port does (issue 11, item 1's converter)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from transformers import InternVLForConditionalGeneration

from build.checkpoint import generate
from build.convert import ConvertError, convert
from engine.weights import load_weights
from tests import reference_chat, reference_preprocess
from tests.test_custom_format import IMAGES, MAX_NEW, SYSTEM, _reference


CUSTOM = {  # build.checkpoint.generate kwargs
    "skywork-6b-qwen2": dict(llm="qwen2", vision="internvit-6b", model_type="skywork_chat"),
    "internlm2": dict(llm="internlm2"),  # converted to the Llama it computes (grouped wqkv split)
}


@pytest.fixture(scope="module", params=sorted(CUSTOM))
def custom(request, tmp_path_factory):
    """Custom-format checkpoints with pixel shuffle v2, sharded (vision + mlp1, then the LLM)."""
    kwargs = CUSTOM[request.param]
    return generate("tiny", out=tmp_path_factory.mktemp("custom") / "ckpt", fmt="custom", ps_version="v2", **kwargs)


def test_converted_checkpoint_loads_in_transformers_with_every_tensor(custom, tmp_path):
    out = convert(custom, tmp_path / "hf", shard_bytes=300_000)
    assert (out / "model.safetensors.index.json").is_file()  # sharded as asked
    model, info = InternVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    prefixes = {"vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector.",
                "language_model.": "model.language_model.", "lm_head.": "lm_head."}  # fmt: skip
    source = {hf + k: v for ours, hf in prefixes.items() for k, v in load_weights(custom, ours).items()}
    assert set(source) == set(state)  # every tensor, nothing more
    assert all(torch.equal(state[k], v) for k, v in source.items())
    assert json.loads((out / "config.json").read_text())["template"] == json.loads((custom / "config.json").read_text())["template"]


def test_converted_checkpoint_answers_as_the_custom_chat_port(custom, tmp_path):
    out = convert(custom, tmp_path / "hf")
    question = "Describe the image in detail."
    expected, _, _ = _reference(custom, question, ("a",), 6)
    other, _, _ = _reference(custom, question, ("b",), 6)
    assert expected != other  # the image matters
    tiles = reference_preprocess.load_image(io.BytesIO(IMAGES["a"]), max_num=6).numpy()
    query, _ = reference_chat.chat_query("internvl2_5", SYSTEM, question, [len(tiles)])
    stop = reference_chat.tokenizer(out).convert_tokens_to_ids("<|im_end|>")
    tokens, _ = reference_chat.generate(out, query, np.asarray(tiles), stop, MAX_NEW)
    assert tokens == expected


def test_what_transformers_cannot_express_is_refused_naming_the_field(tmp_path, checkpoints):
    v1 = generate("tiny", "llama", tmp_path / "v1", fmt="custom", ps_version="v1")
    with pytest.raises(ConvertError, match="'ps_version' is 'v1'"):
        convert(v1, tmp_path / "out")
    with pytest.raises(ConvertError, match="already an HF-native checkpoint"):
        convert(checkpoints["qwen3"], tmp_path / "out2")


def test_converted_tensors_keep_their_stored_dtype(custom, tmp_path):
    """A bf16 checkpoint stays bf16 (not upcast to the engine's float32)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from engine.weights import checkpoint_files

    source = tmp_path / "bf16"
    source.mkdir()
    for file in custom.iterdir():
        if file.suffix != ".safetensors" and file.is_file():
            (source / file.name).write_bytes(file.read_bytes())
    for file in checkpoint_files(custom):
        with safe_open(file, "pt") as f:
            save_file({k: f.get_tensor(k).to(torch.bfloat16) for k in f.keys()}, str(source / file.name))
    out = convert(source, tmp_path / "hf")
    dtypes = {t.dtype for t in load_weights(out, "", dtype=None).values()}
    assert dtypes == {torch.bfloat16}
