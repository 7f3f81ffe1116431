"""A tiny checkpoint that always thinks: its reply is `<think>A</think>B` whatever it is asked.

Random weights never write a tag, so a served reasoning split could not be tested with them. Here
every attention and MLP output projection is zero, so the residual stream at a position is that
token's embedding and the next token depends on the current one only. The LM head then gets one row
per link of a chain: the prompt's last token -> `<think>` -> A -> `</think>` -> B -> the stop token.
With opens_tag the template ends the prompt in `<think>\\n` (Skywork-R1V3 style) and the chain skips
the opening tag.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.config import ModelConfig
from engine.prompt import PromptBuilder
from engine.reasoning import THINK_END, THINK_START
from engine.tokenizer import TextTokenizer

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
LINK_LOGIT = 50.0


def copy_with_think_opening_template(tiny: Path, out: Path) -> Path:
    """The checkpoint with a chat template whose generation prompt ends in `<think>\\n` (Skywork-R1V3 style)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy(tiny / name, out / name)
    config = json.loads((out / "config.json").read_text())
    config.pop("template")  # the tokenizer's chat template then
    (out / "config.json").write_text(json.dumps(config))
    (out / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    return out


def thinking_checkpoint(tiny: Path, out: Path, opens_tag: bool) -> tuple[Path, str, str]:
    """-> (checkpoint, the reasoning its replies carry, their content)."""
    if opens_tag:
        copy_with_think_opening_template(tiny, out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            shutil.copy(tiny / name, out / name)
    config = ModelConfig.from_pretrained(out)
    tokenizer = TextTokenizer(out, config.skip_special_tokens)
    last = int(PromptBuilder(config, tokenizer).build("Hi", []).input_ids[-1])
    think_start, think_end = tokenizer.encode(THINK_START), tokenizer.encode(THINK_END)
    reasoning, content = tokenizer.encode("sky")[:1], tokenizer.encode("blue")[:1]
    assert len(think_start) == len(think_end) == 1, "the tags must be single tokens"
    chain = ([] if opens_tag else think_start) + reasoning + think_end + content + [config.stop_token_id]
    tokens = [last, *chain]
    assert len(set(tokens[:-1])) == len(tokens) - 1, f"each link needs its own token: {tokens}"

    weights = load_file(out / "model.safetensors")
    for name in weights:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            weights[name] = torch.zeros_like(weights[name])
    embed = weights["language_model.model.embed_tokens.weight"].float()
    norm = weights["language_model.model.norm.weight"].float()
    head = weights["language_model.lm_head.weight"].float().clone()
    for current, following in zip(tokens, tokens[1:]):
        hidden = embed[current] * torch.rsqrt(embed[current].pow(2).mean() + config.text.rms_norm_eps) * norm
        head[following] = LINK_LOGIT * hidden / hidden.pow(2).sum()
    weights["language_model.lm_head.weight"] = head.to(weights["language_model.lm_head.weight"].dtype)
    save_file(weights, out / "model.safetensors")
    return out, tokenizer.decode(reasoning).strip(), tokenizer.decode(content).strip()
