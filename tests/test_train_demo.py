"""build/train_demo.py's pieces: the conversations it trains on are the prompts serving builds, the
loss reads only the answers, the presence labels name exactly a scene's items, and a short run writes
a checkpoint serving loads (without the training-only presence head)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from build import train_demo
from build.scenes import SHAPES, draw_scene, scene_questions
from engine.config import ModelConfig
from engine.prompt import PromptBuilder
from engine.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes-init")
    train_demo.initial_checkpoint(out, seed=0)
    return out


def test_a_chat_trains_on_its_answers_and_starts_with_the_prompt_serving_builds(checkpoint):
    maker = train_demo.ExampleMaker(checkpoint)
    config, tokenizer = ModelConfig.from_pretrained(checkpoint), TextTokenizer(checkpoint)
    rng = np.random.default_rng(3)
    scene = draw_scene(rng)
    turns = [(q, a) for _, q, a in scene_questions(rng, scene)][:3]
    example = maker(turns, tiles=[5], images=[0])
    first = PromptBuilder(config, tokenizer).build(turns[0][0], [5]).input_ids
    served = np.where(first >= config.text.vocab_size, config.image_token_id, first)
    assert example.ids[: len(first)].tolist() == served.tolist()
    assert int((example.ids == config.image_token_id).sum()) == 5 * 256  # image tokens once, for all turns
    # the labelled positions are exactly the answers, each followed by the stop token
    labelled = example.labels[example.labels != -100].tolist()
    expected = [t for _, answer in turns for t in tokenizer.encode(answer) + [config.stop_token_id]]
    assert labelled == expected
    assert (example.ids[example.labels != -100] == example.labels[example.labels != -100]).all()


def test_presence_labels_name_exactly_the_scene_items():
    rng = np.random.default_rng(4)
    for _ in range(5):
        scene = draw_scene(rng)
        labels = train_demo.presence(scene)
        named = {pair for pair, on in zip(train_demo.PAIRS, labels) if on}
        assert named == {(i.color, i.shape) for i in scene.items}
        assert len(labels) == 8 * len(SHAPES)


def test_a_short_run_writes_a_checkpoint_without_the_presence_head(tmp_path):
    record = train_demo.train(tmp_path, seed=1, steps=2, groups=1, questions=2, lr=1e-3, vision_lr=1e-3, eval_per_type=0)
    assert json.loads((tmp_path / "generated_by.json").read_text())["vision_lr"] == record["vision_lr"] == 1e-3
    saved = load_file(tmp_path / "model.safetensors")
    assert not any("presence" in key for key in saved)
    assert all(t.dtype == torch.float16 for t in saved.values())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vision_config"]["layer_scale_init_value"] == train_demo.VISION_LAYER_SCALE
