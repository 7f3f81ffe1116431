"""A port of InternVLChatModel.chat() for custom-format checkpoints, written for the tests.

Independent of engine/: from OpenGVLab/InternVL internvl_chat/internvl/model/internvl_chat/
modeling_intern_vit.py (InternVisionEmbeddings, InternAttention._naive_attn with its fused qkv and
q_norm/k_norm over the whole embed dim, InternVisionEncoderLayer with norm1/norm2 by norm_type and
ls1/ls2, hidden_states = embeddings + every layer's output, no final norm) and
modeling_internvl_chat.py (extract_feature: select_layer, drop CLS, pixel_shuffle by ps_version,
mlp1; generate: image-context embeddings replaced, then language_model.generate on inputs_embeds).
The language model is transformers' AutoModelForCausalLM built from `llm_config` and loaded with
the checkpoint's `language_model.*` weights. The query comes from tests/reference_chat.py.

InternLM2 (`llm_config.model_type` internlm2; transformers has no InternLM2 model) runs as
transformers' LlamaForCausalLM: written from internvl_chat/internvl/model/internlm2/
modeling_internlm2.py, InternLM2 with `bias` false is Llama's computation (RMSNorm, default rotary
with rope_theta over head_dim = hidden_size // num_attention_heads, repeat_kv attention scaled by
1/sqrt(head_dim), w2(silu(w1 x) * w3 x), final norm, `output`), so only the weights are renamed
here (own table, not engine/'s) and `attention.wqkv` is split as InternLM2Attention.forward does:
rows '(h gs d)' with gs = groups + 2, query = [:, :groups] flattened '(h gs)', key = [:, -2],
value = [:, -1].
"""

from __future__ import annotations

import json
import tempfile
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def _rms_norm(x, weight, eps):  # InternRMSNorm
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class CustomInternVL:
    def __init__(self, path):
        path = Path(path)
        self.config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        index = json.loads((path / "model.safetensors.index.json").read_text(encoding="utf-8"))
        self.w = {}
        for file in sorted(set(index["weight_map"].values())):
            with safe_open(path / file, "pt") as f:
                self.w.update({k: f.get_tensor(k).float() for k in f.keys()})
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_context_id = self.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        # the language model as its own causal-LM checkpoint (llm_config + language_model.* weights),
        # loaded by from_pretrained, which also maps per-expert MoE weights to its fused layout
        with tempfile.TemporaryDirectory() as llm_dir:
            state = {k[len("language_model.") :]: v.contiguous() for k, v in self.w.items() if k.startswith("language_model.")}
            llm_config = self.config["llm_config"]
            if llm_config.get("model_type") == "internlm2":
                llm_config, state = internlm2_as_llama(llm_config, state)
            AutoConfig.for_model(**llm_config).save_pretrained(llm_dir)
            save_file(state, f"{llm_dir}/model.safetensors", metadata={"format": "pt"})
            llm, info = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32, output_loading_info=True)
        tied = self.config["llm_config"].get("tie_word_embeddings")
        assert not info["unexpected_keys"] and set(info["missing_keys"]) <= ({"lm_head.weight"} if tied else set()), info
        self.llm = llm.eval()

    def _norm(self, x, prefix):
        vc = self.config["vision_config"]
        eps = vc.get("layer_norm_eps", 1e-6)
        if vc.get("norm_type", "rms_norm") == "rms_norm":
            return _rms_norm(x, self.w[prefix + ".weight"], eps)
        return F.layer_norm(x, x.shape[-1:], self.w[prefix + ".weight"], self.w[prefix + ".bias"], eps)

    def vision_hidden_states(self, pixel_values):
        # pixel_values: [T, 3, S, S] normalized -> (embeddings, layer 1 output, ..., layer N output)
        vc, w = self.config["vision_config"], self.w
        p = "vision_model.embeddings."
        patches = F.conv2d(pixel_values, w[p + "patch_embedding.weight"], w[p + "patch_embedding.bias"], stride=vc["patch_size"])
        b, c, h, wd = patches.shape
        x = torch.cat([w[p + "class_embedding"].expand(b, 1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        pos = w[p + "position_embedding"]
        side = vc["image_size"] // vc["patch_size"]
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, wd), mode="bicubic", align_corners=False).reshape(1, -1, h * wd).permute(0, 2, 1)
        x = x + torch.cat([pos[:, :1], grid], dim=1)
        states = [x]
        heads = vc["num_attention_heads"]
        for i in range(vc["num_hidden_layers"]):
            q = f"vision_model.encoder.layers.{i}."
            x = x + self._attention(self._norm(x, q + "norm1"), q + "attn.", heads) * w[q + "ls1"]
            y = F.linear(self._norm(x, q + "norm2"), w[q + "mlp.fc1.weight"], w[q + "mlp.fc1.bias"])
            x = x + F.linear(F.gelu(y), w[q + "mlp.fc2.weight"], w[q + "mlp.fc2.bias"]) * w[q + "ls2"]
            states.append(x)
        return states

    def _attention(self, x, p, heads):
        # InternAttention._naive_attn
        vc, w = self.config["vision_config"], self.w
        B, N, C = x.shape
        qkv = F.linear(x, w[p + "qkv.weight"], w.get(p + "qkv.bias")).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if vc.get("qk_normalization", True):
            eps = vc.get("layer_norm_eps", 1e-6)
            B_, H_, N_, D_ = q.shape
            q = _rms_norm(q.transpose(1, 2).flatten(-2, -1), w[p + "q_norm.weight"], eps).view(B_, N_, H_, D_).transpose(1, 2)
            k = _rms_norm(k.transpose(1, 2).flatten(-2, -1), w[p + "k_norm.weight"], eps).view(B_, N_, H_, D_).transpose(1, 2)
        attn = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return F.linear(x, w[p + "proj.weight"], w[p + "proj.bias"])

    def pixel_shuffle(self, x, scale_factor):
        n, w, h, c = x.size()
        x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
        x = x.permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
        if self.config.get("ps_version", "v1") != "v1":
            x = x.permute(0, 2, 1, 3).contiguous()
        return x

    @torch.no_grad()
    def extract_feature(self, pixel_values):
        # pixel_values: [T, 3, S, S] -> [T, Q, H]
        vit_embeds = self.vision_hidden_states(pixel_values)[self.config.get("select_layer", -1)][:, 1:, :]
        h = w = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], h, w, -1)
        vit_embeds = self.pixel_shuffle(vit_embeds, self.config.get("downsample_ratio", 0.5))
        x = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        w_ = self.w
        x = F.layer_norm(x, x.shape[-1:], w_["mlp1.0.weight"], w_["mlp1.0.bias"], 1e-5)
        x = F.gelu(F.linear(x, w_["mlp1.1.weight"], w_["mlp1.1.bias"]))
        return F.linear(x, w_["mlp1.3.weight"], w_["mlp1.3.bias"])

    @torch.no_grad()
    def generate(self, query, pixel_values, stop_token_id, max_new_tokens):
        """Greedy -> (new token ids without the stop token, min top-1/top-2 logit margin)."""
        return self.generate_from_ids(self.tokenizer(query, return_tensors="pt").input_ids, pixel_values, stop_token_id, max_new_tokens)

    @torch.no_grad()
    def generate_from_ids(self, input_ids, pixel_values, stop_token_id, max_new_tokens):
        # input_ids: [1, L], the tokenized query (image context tokens expanded)
        embeds = self.llm.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            vit_embeds = self.extract_feature(torch.from_numpy(pixel_values))
            B, N, C = embeds.shape
            embeds = embeds.reshape(B * N, C)
            selected = input_ids.reshape(B * N) == self.image_context_id
            assert selected.sum() == vit_embeds.shape[0] * vit_embeds.shape[1]
            embeds[selected] = vit_embeds.reshape(-1, C)
            embeds = embeds.reshape(B, N, C)
        return self._greedy(embeds, stop_token_id, max_new_tokens)

    def _greedy(self, embeds, stop_token_id, max_new_tokens):
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        new = out.sequences[0].tolist()
        margin = min(float(v[0] - v[1]) for v in (s[0].topk(2).values for s in out.scores))
        return [t for t in new if t != stop_token_id], margin

    def reply(self, token_ids, sep):
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).split(sep.strip())[0].strip()


_INTERNLM2_TO_LLAMA = {
    "attention.wo.": "self_attn.o_proj.",
    "feed_forward.w1.": "mlp.gate_proj.",
    "feed_forward.w3.": "mlp.up_proj.",
    "feed_forward.w2.": "mlp.down_proj.",
    "attention_norm.": "input_layernorm.",
    "ffn_norm.": "post_attention_layernorm.",
}


def internlm2_as_llama(cfg, state):
    """InternLM2Config + InternLM2ForCausalLM state dict (without language_model.) -> a LlamaConfig
    dict + LlamaForCausalLM state dict."""
    assert cfg.get("bias") is False, "the port covers bias false"
    scaling = cfg.get("rope_scaling")
    assert scaling is None or scaling["type"] == "dynamic", "the port covers no / dynamic NTK rope scaling"
    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000))}
    if scaling is not None:  # transformers' dynamic NTK (rescales beyond max_position_embeddings)
        rope.update(rope_type="dynamic", factor=float(scaling["factor"]))
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    groups, head_dim = heads // kv_heads, hidden // heads
    llama = dict(
        model_type="llama",
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_parameters=rope,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
    )
    out = {}
    for key, tensor in state.items():
        if key == "output.weight":
            out["lm_head.weight"] = tensor
        elif key == "model.tok_embeddings.weight":
            out["model.embed_tokens.weight"] = tensor
        elif key.endswith("attention.wqkv.weight"):
            layer = key[: -len("attention.wqkv.weight")]
            rows = tensor.view(kv_heads, groups + 2, head_dim, hidden)  # 'b q (h gs d)' on the output rows
            out[layer + "self_attn.q_proj.weight"] = rows[:, :groups].reshape(heads * head_dim, hidden)
            out[layer + "self_attn.k_proj.weight"] = rows[:, -2].reshape(kv_heads * head_dim, hidden)
            out[layer + "self_attn.v_proj.weight"] = rows[:, -1].reshape(kv_heads * head_dim, hidden)
        else:
            for old, new in _INTERNLM2_TO_LLAMA.items():
                key = key.replace("." + old, "." + new)
            out[key] = tensor.contiguous()
    return llama, {k: v.contiguous() for k, v in out.items()}


@cache
def model(path) -> CustomInternVL:
    return CustomInternVL(path)
