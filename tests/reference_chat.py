"""A port of the InternVL `model.chat` prompt construction, written from the model cards for the tests.

Independent of engine/: the conversation is spelled out per template (conversation.py's MPT
style), images are expanded by string replacement and the whole query is tokenized with
transformers' AutoTokenizer, exactly as `model.chat` does.
"""

from __future__ import annotations

from functools import cache

import torch
from transformers import AutoTokenizer, InternVLForConditionalGeneration

# name: (system template, roles, sep[, sep2]): conversation.py's MPT, or MPT_TWO with sep2
TEMPLATES = {
    "internvl2_5": ("<|im_start|>system\n{}", ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>\n"),
    "Hermes-2": ("<|im_start|>system\n{}", ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>"),
    "internlm2-chat": ("<|im_start|>system\n{}", ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>"),
    "phi3-chat": ("<|system|>\n{}", ("<|user|>\n", "<|assistant|>\n"), "<|end|>"),
    "internvl3_5_gpt_oss": (
        "<|start|>system<|message|>{}", ("<|start|>user<|message|>", "<|start|>assistant"), "<|end|>", "<|return|>"
    ),
}


def mpt_two_prompt(template, system, messages):
    """conversation.py's MPT_TWO get_prompt: sep after each message, but sep2 after a final assistant
    message; messages: [(role index, text or None)]."""
    system_template, roles, sep, sep2 = TEMPLATES[template]
    out = system_template.format(system) + sep
    for i, (role, text) in enumerate(messages):
        if text is None:
            out += roles[role]
        else:
            out += roles[role] + text + (sep2 if i == len(messages) - 1 and role == 1 else sep)
    return out


def chat_query(template, system, question, num_patches_list, history=None, tokens_per_tile=256):
    """-> (query with images expanded, question as it enters the history)."""
    if history is None and num_patches_list and "<image>" not in question:
        # model.chat prepends one tag (one image); the cards' multi-image scripts one per image
        # (Skywork-R1V3's: "<image>\n" * len(image_paths) + question)
        question = "<image>\n" * len(num_patches_list) + question
    system_template, (user, assistant), sep = TEMPLATES[template][:3]
    query = system_template.format(system) + sep
    for old_question, old_answer in history or []:
        query += user + old_question + sep + assistant + old_answer + sep
    query += user + question + sep + assistant
    for num_patches in num_patches_list:
        query = query.replace("<image>", "<img>" + "<IMG_CONTEXT>" * tokens_per_tile * num_patches + "</img>", 1)
    return query, question


@cache
def tokenizer(path):
    return AutoTokenizer.from_pretrained(path)


@cache
def model(path):
    return InternVLForConditionalGeneration.from_pretrained(path).eval()


@torch.no_grad()
def generate(path, query, pixel_values, stop_token_id, max_new_tokens):
    """Greedy transformers generate -> (new token ids without the stop token, min top-1/top-2 logit margin)."""
    ids = tokenizer(path)(query, return_tensors="pt").input_ids
    extra = {"pixel_values": torch.from_numpy(pixel_values)} if pixel_values is not None else {}
    out = model(path).generate(
        input_ids=ids,
        **extra,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, ids.shape[1] :].tolist()
    top2 = [scores[0].topk(2).values for scores in out.scores]
    margin = min(float(v[0] - v[1]) for v in top2)
    return [t for t in new if t != stop_token_id], margin


def reply(path, token_ids, sep, skip_special_tokens=True):
    """model.chat's reply: decoded (InternVL3.5-GPT-OSS's chat() keeps special tokens), cut at sep."""
    return tokenizer(path).decode(token_ids, skip_special_tokens=skip_special_tokens).split(sep.strip())[0].strip()
