"""build/train_demo.py's pieces: the conversations it trains on are the prompts serving builds, the
loss reads only the answers, a batch of right-padded chats scores each chat as it scores alone, a step
holds its tile budget, and a short run writes a checkpoint serving loads whose tower stage 2 left alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import InternVLForConditionalGeneration

from build import train_demo
from build.scenes import draw_scene, scene_questions
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
    scene = draw_scene(rng, n_shapes=2)
    turns = scene_questions(rng, scene)[:3]
    example = maker(turns, tiles=[5], images=[0])
    first = PromptBuilder(config, tokenizer).build(turns[0][1], [5]).input_ids
    served = np.where(first >= config.text.vocab_size, config.image_token_id, first)
    assert example.ids[: len(first)].tolist() == served.tolist()
    assert int((example.ids == config.image_token_id).sum()) == 5 * 256  # image tokens once, for all turns
    # the labelled positions are exactly the answers, each followed by the stop token, in turn order
    labelled = example.labels[example.labels != -100].tolist()
    expected = [t for _, _, answer in turns for t in tokenizer.encode(answer) + [config.stop_token_id]]
    assert labelled == expected
    assert (example.ids[example.labels != -100] == example.labels[example.labels != -100]).all()
    assert [kind for kind, _, _ in example.answers] == [kind for kind, _, _ in turns]
    for (_, start, end), (_, _, answer) in zip(example.answers, turns):
        assert example.labels[start:end].tolist() == tokenizer.encode(answer) + [config.stop_token_id]


def test_a_step_holds_its_tile_budget_and_its_chats_point_at_their_images(checkpoint):
    maker = train_demo.ExampleMaker(checkpoint)
    rng = np.random.default_rng(5)
    for budget in (1, 6):
        pixel_values, tiles, examples = train_demo.draw_step(rng, budget, maker, questions_per_group=3, tiles_per_step=12)
        assert len(pixel_values) == sum(tiles) >= 12
        assert sum(tiles) - max(tiles) * 2 < 12  # it stops at the first group past the budget
        assert all(t == 1 for t in tiles) if budget == 1 else all(1 <= t <= budget + 1 for t in tiles)
        assert sorted(i for e in examples for i in e.images) == list(range(len(tiles)))
        for e in examples:
            assert int((e.ids == maker.image_token_id).sum()) == 256 * sum(tiles[i] for i in e.images)
            assert 1 <= len(e.answers) <= 3


def test_stage_two_steps_repeat_for_a_seed_and_differ_across_seeds(checkpoint):
    def drawn(seed):
        return [(tiles, [e.ids.tolist() for e in examples]) for _, tiles, examples in train_demo.Steps(checkpoint, seed, steps=3, questions=2)]

    assert drawn(7) == drawn(7)
    assert drawn(7) != drawn(8)


def test_right_padded_chats_in_one_batch_score_as_each_alone(checkpoint):
    model = InternVLForConditionalGeneration.from_pretrained(checkpoint).eval()
    maker = train_demo.ExampleMaker(checkpoint)
    rng = np.random.default_rng(6)
    pixel_values, tiles, examples = train_demo.draw_step(rng, 1, maker, questions_per_group=4, tiles_per_step=6)
    assert len({len(e.ids) for e in examples}) > 1  # some padding happens
    with torch.no_grad():
        batched, hits = train_demo.loss_of(model, pixel_values, tiles, examples, maker.image_token_id)
        total = tokens = 0
        for e in examples:  # each chat alone, its images alone
            images = [pixel_values[sum(tiles[:i]) : sum(tiles[: i + 1])] for i in e.images]
            alone = train_demo.Example(e.ids, e.labels, list(range(len(images))), e.answers)
            loss, _ = train_demo.loss_of(model, torch.cat(images), [tiles[i] for i in e.images], [alone], maker.image_token_id)
            n = int((e.labels != -100).sum())
            total, tokens = total + loss * n, tokens + n
    torch.testing.assert_close(batched, total / tokens, rtol=1e-4, atol=1e-5)
    assert sum(len(h) for h in hits.values()) == sum(len(e.answers) for e in examples)


def test_a_short_run_writes_fp16_and_stage_two_leaves_the_tower_alone(tmp_path):
    record = train_demo.train(tmp_path, seed=1, tower_steps=0, steps=2, questions=2, lr=1e-3, vision_lr=1e-3, eval_per_type=0)
    assert json.loads((tmp_path / "generated_by.json").read_text())["steps"] == record["steps"] == 2
    saved = load_file(tmp_path / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in saved.values())
    train_demo.initial_checkpoint(tmp_path / "again", seed=1)
    initial = load_file(tmp_path / "again" / "model.safetensors")
    tower = [k for k in saved if "vision_tower" in k]
    assert tower and all(torch.equal(saved[k], initial[k].half()) for k in tower)
    llm = [k for k in saved if "language_model" in k and "norm" not in k]
    assert any(not torch.equal(saved[k], initial[k].half()) for k in llm)  # stage 2 trained the LLM
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vision_config"]["layer_scale_init_value"] == train_demo.VISION_LAYER_SCALE
    assert config["text_config"]["initializer_range"] == train_demo.TEXT_INIT_STD


def test_stage_one_trains_the_tower_and_keeps_its_heads_out_of_the_checkpoint(tmp_path):
    model = train_demo.initial_checkpoint(tmp_path, seed=2)
    before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    accuracy = train_demo.pretrain_tower(model, np.random.default_rng(2), steps=2)
    assert set(accuracy) == {"max", "attention"} and all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert any(not torch.equal(before[k], v) for k, v in model.model.vision_tower.state_dict().items())
    assert not any(k.startswith(("max", "attention")) for k in model.state_dict())
