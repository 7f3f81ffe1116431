"""Train the shapes demo model: a tiny InternVL that answers questions about synthetic scenes.

    python -m build.train_demo --out models/shapes-demo

From scratch, on the CPU, seeded: the `shapes-demo` preset (InternViT-style tower at 448 px / patch
14, pixel shuffle 0.5 → 256 tokens per tile, MLP projector, Qwen3 LLM, our BPE tokenizer, template
internvl2_5) learns the questions of build/scenes.py, on tiles cut by the real dynamic preprocessing
(engine/preprocess.py) and prompts built by the engine's own PromptBuilder — what it is trained on is
exactly what serving feeds it. Two stages:
1. build/train_tower.py: the tower and projector learn per image token the colour and shape covering
   its cell and whether a shape's centre is there (dense linear probes, training only), on scenes of
   every size at tile budgets 1, 6, 12 in turn;
2. the tower frozen, a pool of scenes is encoded once (build/feature_cache.py) and the projector and LLM
   learn the answers from the cached features, budgets 1, then 1 and 6, then 1, 6 and 12. All questions
   about a scene (group) are turns of one chat (its image tokens enter the LLM once), and chats with the
   same number of image tokens train as one right-padded batch.
The result is a normal HF-native checkpoint (fp16 storage) plus `generated_by.json` with the
command's settings, wall time and held-out accuracy per question type.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import InternVLForConditionalGeneration

from build.checkpoint import build_config, train_tokenizer
from build.feature_cache import Pool, encode_pool
from build.presets import PRESETS
from build.scenes import QUESTION_TYPES, WHICH_PREFIX, answer_matches, make_sample, scene_questions, which_questions
from build.train_state import Progress
from build.train_tower import pretrain_tower
from engine.config import ModelConfig
from engine.pipeline import Pipeline
from engine.prompt import PromptBuilder
from engine.tokenizer import TextTokenizer

ROOT = Path(__file__).resolve().parents[1]
PRESET = "shapes-demo"
# Tile budgets of the curriculum, as evaluation uses them. Stage 2's steps split evenly into as many
# phases; phase k draws its budgets from the first k + 1 (1; then 1 and 6; then 1, 6 and 12).
BUDGETS = (1, 6, 12)
# A stage-2 step holds about TILES_PER_STEP tiles: budget-1 steps train many short chats and budget-12
# steps a few 5–13 tile images.
TILES_PER_STEP = 24
EVAL_SEED_OFFSET = 10_000  # held-out scenes: seed + this
TWO_IMAGE_SHARE = 0.3  # scene groups of two images, asked "Which image has …?"
# Initialisation of the from-scratch model. With the big-model defaults (std 0.02, layer scale 0.1) a
# 96-wide tower's blocks add ~10× less than its linear patch embedding, and shape features came ~4× slower
# (probe: a shape classifier on the tower alone, single-shape 448 px scenes); the 192-wide LLM likewise
# starts at unit gain (1/sqrt(hidden)).
VISION_INIT_STD = 0.1
VISION_LAYER_SCALE = 1.0
TEXT_INIT_STD = 0.07


@dataclass
class Example:
    ids: torch.Tensor  # [L] int64, image positions hold the <IMG_CONTEXT> id
    labels: torch.Tensor  # [L] int64, -100 outside the answers
    images: list[int]  # indices into the step's image list, in tag order
    answers: list[tuple[str, int, int]]  # (question kind, start, end) of each answer in `labels`


class ExampleMaker:
    """Conversations exactly as serving builds them, every answer followed by the stop token.

    Several questions about the same images share one sequence as a multi-turn chat: the image tokens
    are paid for once, the first turn is the single-question prompt serving sees, and later turns are
    the history prompts of a follow-up question (model.chat: the tags sit in the first question)."""

    def __init__(self, checkpoint: Path):
        config = ModelConfig.from_pretrained(checkpoint)
        self.tokenizer = TextTokenizer(checkpoint)
        self.builder = PromptBuilder(config, self.tokenizer)
        self.vocab_size = config.text.vocab_size
        self.image_token_id = config.image_token_id
        self.stop_id = config.stop_token_id

    def __call__(self, turns: list[tuple[str, str, str]], tiles: list[int], images: list[int]) -> Example:
        # turns: (kind, question, answer)
        ids: list[int] = []
        labels: list[int] = []
        answers: list[tuple[str, int, int]] = []
        history: list[tuple[str, str]] = []
        for kind, question, answer in turns:
            prompt = self.builder.build(question, tiles, history or None)
            prompt_ids = prompt.input_ids.tolist()
            if prompt_ids[: len(ids)] != ids:  # the template renders a finished turn as the reply + stop token
                raise ValueError(f"turn {len(history) + 1} does not extend the conversation's tokens")
            reply = self.tokenizer.encode(answer) + [self.stop_id]
            labels += [-100] * (len(prompt_ids) - len(ids)) + reply
            answers.append((kind, len(labels) - len(reply), len(labels)))
            ids = prompt_ids + reply
            history.append((prompt.question, answer))
        tokens = torch.tensor(ids)
        tokens[tokens >= self.vocab_size] = self.image_token_id
        return Example(tokens, torch.tensor(labels), images, answers)


def draw_step(rng: np.random.Generator, pool: Pool, budget: int, maker: ExampleMaker, questions_per_group: int, tiles_per_step: int):
    """-> (tower features [T, Q, C] of the step's images, tiles per image, examples): groups of pool scenes
    at one tile budget until the step holds `tiles_per_step` tiles (at least one group)."""
    features, tiles, examples = [], [], []
    while sum(tiles) < tiles_per_step:
        two = rng.random() < TWO_IMAGE_SHARE
        picked = rng.choice(len(pool), 2 if two else 1, replace=False).tolist()
        scenes = tuple(pool.scenes[i] for i in picked)
        asked = which_questions(rng, scenes) if two else scene_questions(rng, scenes[0])
        if not asked:
            continue
        refs = list(range(len(tiles), len(tiles) + len(scenes)))
        for i in picked:
            features.append(torch.from_numpy(pool.scene_features(i, budget).astype(np.float32)))
            tiles.append(len(features[-1]))
        order = rng.permutation(len(asked))[:questions_per_group]
        # the image tags go with the first question only (follow-ups of a chat carry none)
        turns = [(asked[k][0], asked[k][1] if n == 0 else asked[k][1].removeprefix(WHICH_PREFIX), asked[k][2]) for n, k in enumerate(order)]
        examples.append(maker(turns, [tiles[i] for i in refs], refs))
    return torch.cat(features), tiles, examples


class Steps(torch.utils.data.IterableDataset):
    """Stage 2's steps `start`..`steps`, drawn in a DataLoader worker while the model trains on the step
    before. Step s draws from seed (seed, 2, s), its tile budget from the curriculum phase it falls in."""

    def __init__(self, checkpoint: Path, pool: Path, seed: int, start: int, steps: int, questions: int):
        self.checkpoint, self.pool = checkpoint, pool
        self.seed, self.start, self.steps, self.questions = seed, start, steps, questions

    def __iter__(self):
        maker, pool = ExampleMaker(self.checkpoint), Pool(self.pool)
        for step in range(self.start, self.steps):
            rng = np.random.default_rng([self.seed, 2, step])
            phase = min(step * len(pool.budgets) // self.steps, len(pool.budgets) - 1)
            budget = pool.budgets[rng.integers(phase + 1)]
            yield draw_step(rng, pool, budget, maker, self.questions, TILES_PER_STEP)


def loss_of(model: InternVLForConditionalGeneration, features: torch.Tensor, tiles, examples, image_token_id: int):
    """features: [T, Q, H] projected image features of the step's images, in order
    -> (mean answer-token loss, {kind: [whether each answer's tokens were all predicted right]})."""
    inner = model.model
    per_image = list(torch.split(features, tiles))  # image i: [T_i, Q, H]
    total, answer_tokens, right = features.new_zeros(()), 0, {}
    # Chats with the same number of image tokens run as one batch, right-padded: a causal model's real
    # tokens never see the padding after them. Lengths across buckets differ by thousands of image tokens.
    buckets: dict[int, list[Example]] = {}
    for e in examples:
        buckets.setdefault(sum(tiles[i] for i in e.images), []).append(e)
    for bucket in buckets.values():
        width = max(len(e.ids) for e in bucket)
        ids = torch.stack([F.pad(e.ids, (0, width - len(e.ids)), value=0) for e in bucket])  # [B, W]
        labels = torch.stack([F.pad(e.labels, (0, width - len(e.labels)), value=-100) for e in bucket])
        embeds = inner.get_input_embeddings()(ids)  # [B, W, H]
        image_rows = torch.cat([per_image[i] for e in bucket for i in e.images]).reshape(-1, features.shape[-1])
        embeds = embeds.masked_scatter((ids == image_token_id)[..., None], image_rows.to(embeds.dtype))
        hidden = inner.language_model(inputs_embeds=embeds).last_hidden_state
        # next-token loss on the answer positions only (the lm_head runs on those rows alone)
        targets = labels[:, 1:]
        picked = targets != -100
        logits = model.lm_head(hidden[:, :-1][picked])
        total = total + F.cross_entropy(logits.float(), targets[picked], reduction="sum")
        answer_tokens += int(picked.sum())
        hit = torch.zeros_like(targets, dtype=torch.bool)
        hit[picked] = logits.argmax(-1) == targets[picked]
        for row, e in enumerate(bucket):
            for kind, start, end in e.answers:  # label positions start..end are predicted from start-1..end-1
                right.setdefault(kind, []).append(bool(hit[row, start - 1 : end - 1].all()))
    return total / answer_tokens, right


def held_out_accuracy(chat, seed: int, per_type: int) -> dict[str, float]:
    """Accuracy per question type on fresh scenes; chat(question, images) -> reply."""
    rng = np.random.default_rng(seed)
    right = dict.fromkeys(QUESTION_TYPES, 0)
    for kind in QUESTION_TYPES:
        for _ in range(per_type):
            sample = make_sample(rng, kind)
            right[kind] += answer_matches(sample, chat(sample.question, [s.image for s in sample.scenes]))
    return {kind: right[kind] / per_type for kind in QUESTION_TYPES}


def initial_checkpoint(out: Path, seed: int) -> InternVLForConditionalGeneration:
    torch.manual_seed(seed)
    preset = PRESETS[PRESET]
    tokenizer = train_tokenizer(preset.tokenizer_vocab)
    config = build_config(preset, "qwen3", tokenizer)
    config.vision_config.initializer_range = VISION_INIT_STD
    config.vision_config.layer_scale_init_value = VISION_LAYER_SCALE
    config.text_config.initializer_range = TEXT_INIT_STD
    model = InternVLForConditionalGeneration(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def evaluate(out: Path, seed: int, per_type: int) -> dict[str, float]:
    """Held-out accuracy of the saved checkpoint, served in-process the way Triton serves it (ONNX vision)."""
    with Pipeline.from_pretrained(out) as pipe:
        return held_out_accuracy(lambda q, images: pipe.chat(q, images, max_new_tokens=32), seed, per_type)


def train(out: Path, work: Path, seed: int, tower_steps: int, pool_scenes: int, steps: int, questions: int, lr: float, vision_lr: float, eval_per_type: int) -> dict:
    """Stage 1 (`tower_steps`): build/train_tower.py. Then `pool_scenes` scenes encoded once
    (build/feature_cache.py). Stage 2 (`steps`): the tower frozen, projector (`vision_lr`) and LLM (`lr`)
    learn to answer from the cached features. Progress and the pool live in `work`; a killed run resumes."""
    start = time.time()
    model = initial_checkpoint(out, seed).train()  # seeded: a resumed run starts from the same weights
    tower_accuracy = pretrain_tower(model, seed, tower_steps, BUDGETS, work / "stage1.pt") if tower_steps else None
    inner = model.model
    inner.vision_tower.requires_grad_(False)
    pool = encode_pool(model.eval(), work / "pool", seed, pool_scenes, BUDGETS)
    model.train()
    projector = list(inner.multi_modal_projector.parameters())
    seen = {id(p) for p in projector}
    llm = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    optimizer = torch.optim.AdamW([dict(params=projector, lr=vision_lr), dict(params=llm, lr=lr)], weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    progress = Progress(work / "stage2.pt", model=model, optimizer=optimizer, schedule=schedule)
    done = progress.resume()
    ema, right = progress.extra.get("ema"), progress.extra.get("right", {kind: [] for kind in QUESTION_TYPES})
    drawn = torch.utils.data.DataLoader(Steps(out, pool, seed, done, steps, questions), batch_size=None, num_workers=1, prefetch_factor=2)
    bar = tqdm(drawn, initial=done, total=steps, desc="stage 2: answers", unit="step")
    for step, (shuffled, tiles, examples) in enumerate(bar, start=done):
        loss, hits = loss_of(model, inner.multi_modal_projector(shuffled), tiles, examples, model.config.image_token_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*projector, *llm], 1.0)
        optimizer.step()
        schedule.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        right = {kind: (right[kind] + hits.get(kind, []))[-200:] for kind in QUESTION_TYPES}
        # teacher-forced accuracy of the last 200 answers per kind
        bar.set_postfix(loss=f"{ema:.3f}", **{kind: f"{np.mean(h):.2f}" for kind, h in right.items() if h})
        progress.save(step + 1, force=step + 1 == steps, ema=ema, right=right)
    model.eval().to(PRESETS[PRESET].dtype).save_pretrained(out)
    settings = dict(preset=PRESET, seed=seed, tower_steps=tower_steps, pool_scenes=pool_scenes, steps=steps, questions=questions, lr=lr, vision_lr=vision_lr)
    record = dict(settings, tower_accuracy=tower_accuracy, final_loss=None if ema is None else round(ema, 4), wall_seconds=round(time.time() - start))
    if eval_per_type:  # scenes of another seed than any training step's
        record["held_out_accuracy"] = evaluate(out, seed + EVAL_SEED_OFFSET, eval_per_type)
    (out / "generated_by.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m build.train_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the scenes (default: 0)")
    parser.add_argument("--work", type=Path, default=None, help="progress and the encoded scene pool (default: artifacts/train_demo/seed-N)")
    parser.add_argument("--tower-steps", type=int, default=600, help="stage 1 steps: the tower learns what each token shows (default: 600)")
    parser.add_argument("--pool-scenes", type=int, default=2000, help="scenes encoded once for stage 2 (default: 2000)")
    parser.add_argument("--steps", type=int, default=1800, help="stage 2 steps: the projector and LLM learn the answers (default: 1800)")
    parser.add_argument("--questions", type=int, default=6, help="questions asked per scene group, as turns of one chat (default: 6)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the LLM, cosine decay (default: 0.003)")
    parser.add_argument("--vision-lr", type=float, default=1e-3, help="peak learning rate of the projector in stage 2 (default: 0.001)")
    parser.add_argument("--eval-per-type", type=int, default=50, help="held-out questions per type scored after training, 0 skips (default: 50)")
    args = parser.parse_args()
    work = args.work or ROOT / "artifacts" / "train_demo" / f"seed-{args.seed}"
    record = train(args.out, work, args.seed, args.tower_steps, args.pool_scenes, args.steps, args.questions, args.lr, args.vision_lr, args.eval_per_type)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
