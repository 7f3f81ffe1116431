"""build/train_demo.py's pieces: the conversations it trains on are the prompts serving builds, the
loss reads only the answers, the cached pool holds what the tower makes of each scene (and the
projector then gives what serving's encoder gives), a batch of right-padded chats scores each chat as it
scores alone, a step holds its tile budget, runs resume where they were killed, and a short run writes a
checkpoint serving loads whose tower stage 2 left alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import InternVLForConditionalGeneration

from build import train_demo, train_state, train_tower
from build.feature_cache import Pool, encode_pool, shuffled_features
from build.scenes import draw_scene, scene_questions
from engine.config import ModelConfig
from engine.preprocess import load_images
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


@pytest.fixture(scope="module")
def pool(checkpoint, tmp_path_factory):
    model = InternVLForConditionalGeneration.from_pretrained(checkpoint).eval()
    return encode_pool(model, tmp_path_factory.mktemp("pool"), seed=4, scenes=8, budgets=(1, 6))


def _channels(checkpoint) -> int:
    config = json.loads((checkpoint / "config.json").read_text())
    return config["vision_config"]["hidden_size"] * 4  # pixel shuffle 0.5: 4 patches per token


def test_the_pool_holds_each_scene_as_the_tower_sees_it_at_each_budget(checkpoint, pool):
    model = InternVLForConditionalGeneration.from_pretrained(checkpoint).eval()
    cached = Pool(pool)
    rng = np.random.default_rng([4, 3])  # encode_pool's scene stream
    for index in range(len(cached)):
        scene = draw_scene(rng)
        assert cached.scenes[index].items == scene.items
        for budget in (1, 6):
            pixel_values, (count,) = load_images([scene.image], max_num=budget)
            with torch.no_grad():
                expected = shuffled_features(model, torch.from_numpy(pixel_values))
                features = torch.from_numpy(cached.scene_features(index, budget).astype(np.float32))
                assert features.shape == expected.shape == (count, 256, _channels(checkpoint))
                torch.testing.assert_close(features, expected, rtol=2e-3, atol=2e-3)  # fp16 storage
                # what stage 2 feeds the LLM is what serving's encoder gives for these tiles
                served = train_tower.image_features(model, torch.from_numpy(pixel_values))
                torch.testing.assert_close(model.model.multi_modal_projector(expected), served, rtol=1e-4, atol=1e-5)
    assert not np.array_equal(cached.scene_features(0, 1), cached.scene_features(1, 1))


def test_a_step_holds_its_tile_budget_and_its_chats_point_at_their_images(checkpoint, pool):
    maker = train_demo.ExampleMaker(checkpoint)
    cached = Pool(pool)
    rng = np.random.default_rng(5)
    for budget in (1, 6):
        features, tiles, examples = train_demo.draw_step(rng, cached, budget, maker, questions_per_group=3, tiles_per_step=12)
        assert len(features) == sum(tiles) >= 12
        assert sum(tiles) - max(tiles) * 2 < 12  # it stops at the first group past the budget
        assert all(t == 1 for t in tiles) if budget == 1 else all(1 <= t <= budget + 1 for t in tiles)
        assert sorted(i for e in examples for i in e.images) == list(range(len(tiles)))
        for e in examples:
            assert int((e.ids == maker.image_token_id).sum()) == 256 * sum(tiles[i] for i in e.images)
            assert 1 <= len(e.answers) <= 3


def test_stage_two_steps_repeat_for_a_seed_differ_across_seeds_and_resume_mid_way(checkpoint, pool):
    def drawn(seed, start=0):
        steps = train_demo.Steps(checkpoint, pool, seed, start, steps=3, questions=2)
        return [(tiles, [e.ids.tolist() for e in examples]) for _, tiles, examples in steps]

    assert drawn(7) == drawn(7)
    assert drawn(7) != drawn(8)
    assert drawn(7, start=1) == drawn(7)[1:]


def test_right_padded_chats_in_one_batch_score_as_each_alone(checkpoint, pool):
    model = InternVLForConditionalGeneration.from_pretrained(checkpoint).eval()
    maker = train_demo.ExampleMaker(checkpoint)
    rng = np.random.default_rng(6)
    shuffled, tiles, examples = train_demo.draw_step(rng, Pool(pool), 1, maker, questions_per_group=4, tiles_per_step=6)
    assert len({len(e.ids) for e in examples}) > 1  # some padding happens
    with torch.no_grad():
        features = model.model.multi_modal_projector(shuffled)
        batched, hits = train_demo.loss_of(model, features, tiles, examples, maker.image_token_id)
        total = tokens = 0
        for e in examples:  # each chat alone, its images alone
            images = [features[sum(tiles[:i]) : sum(tiles[: i + 1])] for i in e.images]
            alone = train_demo.Example(e.ids, e.labels, list(range(len(images))), e.answers)
            loss, _ = train_demo.loss_of(model, torch.cat(images), [tiles[i] for i in e.images], [alone], maker.image_token_id)
            n = int((e.labels != -100).sum())
            total, tokens = total + loss * n, tokens + n
    torch.testing.assert_close(batched, total / tokens, rtol=1e-4, atol=1e-5)
    assert sum(len(h) for h in hits.values()) == sum(len(e.answers) for e in examples)


def test_a_short_run_writes_fp16_and_stage_two_leaves_the_tower_alone(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    record = train_demo.train(out, work, seed=1, tower_steps=0, pool_scenes=3, steps=2, questions=2, lr=1e-3, vision_lr=1e-3, eval_per_type=0)
    assert json.loads((out / "generated_by.json").read_text())["steps"] == record["steps"] == 2
    saved = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in saved.values())
    assert not any(p.name.endswith((".pt", ".f16")) for p in out.rglob("*"))  # progress and pool stay in work
    train_demo.initial_checkpoint(tmp_path / "again", seed=1)
    initial = load_file(tmp_path / "again" / "model.safetensors")
    tower = [k for k in saved if "vision_tower" in k]
    assert tower and all(torch.equal(saved[k], initial[k].half()) for k in tower)
    llm = [k for k in saved if "language_model" in k and "norm" not in k]
    assert any(not torch.equal(saved[k], initial[k].half()) for k in llm)  # stage 2 trained the LLM
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["layer_scale_init_value"] == train_demo.VISION_LAYER_SCALE
    assert config["text_config"]["initializer_range"] == train_demo.TEXT_INIT_STD


def test_stage_one_trains_the_tower_keeps_its_probes_out_and_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    whole = train_demo.initial_checkpoint(tmp_path / "a", seed=2)
    before = {k: v.clone() for k, v in whole.model.vision_tower.state_dict().items()}
    accuracy = train_tower.pretrain_tower(whole, 2, 3, (1, 6), tmp_path / "a.pt")
    assert set(accuracy) == {"colour", "shape", "centre"} and all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert any(not torch.equal(before[k], v) for k, v in whole.model.vision_tower.state_dict().items())
    assert not any(k.startswith(tuple(train_tower.HEADS)) for k in whole.state_dict())

    monkeypatch.setattr(train_state, "SAVE_SECONDS", 0.0)  # save after every step
    real, calls = train_tower.draw_tiles, []

    def dies_at_the_third_step(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    killed = train_demo.initial_checkpoint(tmp_path / "b", seed=2)
    monkeypatch.setattr(train_tower, "draw_tiles", dies_at_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        train_tower.pretrain_tower(killed, 2, 3, (1, 6), tmp_path / "b.pt")
    resumed = train_demo.initial_checkpoint(tmp_path / "b", seed=2)
    train_tower.pretrain_tower(resumed, 2, 3, (1, 6), tmp_path / "b.pt")
    assert len(calls) == 4  # steps 1, 2, the killed 3rd, then only the 3rd again
    for k, v in whole.model.vision_tower.state_dict().items():
        torch.testing.assert_close(resumed.model.vision_tower.state_dict()[k], v)
