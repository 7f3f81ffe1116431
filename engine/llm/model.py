"""A lean Qwen2 / Qwen3 / Qwen3-MoE / Llama / GPT-OSS decoder that runs several sequences per step
(in-flight batching).

All new tokens of a step — whole prompts of sequences being prefilled and one token of each
sequence being decoded — go through the projections and the MLP as one flat batch [N, H], so the
weights are read once per step (a Qwen3-MoE layer routes that whole batch: engine/llm/moe.py).
Attention runs per sequence against that sequence's own preallocated KV cache. Token ids
≥ vocab_size read their embedding from the sequence's prompt table (TensorRT-LLM's prompt-table
convention). GPT-OSS adds attention sinks and sliding-window layers (transformers 5.23
`models/gpt_oss/modeling_gpt_oss.py`, eager_attention_forward: a per-head sink logit joins the
softmax and its share is dropped; `masking_utils.sliding_window_overlay`: a query sees keys
p - window < j ≤ p) and YaRN rotary (engine/llm/rope.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.text_config import TextConfig
from engine.llm.linear import Linear
from engine.llm.moe import SparseMoE
from engine.llm import cpu_ops
from engine.llm.int8 import Int8Rows
from engine.llm.precision import check_half_range, check_llm_weights, stored_weights
from engine.llm.rope import rope_tables
from engine.weights import load_weights


class KVCache:
    """One sequence's keys and values for every layer, sized for its whole life at admission."""

    def __init__(self, config: TextConfig, capacity: int, dtype: torch.dtype):
        shape = (config.num_layers, config.num_kv_heads, capacity, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype)
        self.v = torch.empty(shape, dtype=dtype)


@dataclass(slots=True)
class SequenceInput:
    token_ids: torch.Tensor  # int64 [n]: new tokens (a prompt, or the last sampled token)
    start: int  # position of token_ids[0]; tokens before it are in the cache
    cache: KVCache
    prompt_table: torch.Tensor | None  # [P, H] rows for ids vocab_size..vocab_size+P-1


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as transformers' Qwen/Llama RMSNorm (float32 statistics).
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderLM:
    def __init__(
        self,
        config: TextConfig,
        weights: dict[str, torch.Tensor],  # decoder weights, names without "language_model."
        lm_head: torch.Tensor | None,
        dtype: torch.dtype = torch.float32,
        llm_weights: str = "float32",  # or "float16", "int8": engine/llm/precision.py
    ):
        self.config = config
        self.dtype = dtype
        # what the matrices are stored in: int8 falls back to float16 (with a warning) without its kernel
        self.llm_weights = precision = stored_weights(llm_weights, dtype)
        if precision == "float16":
            check_half_range({**weights, **({} if lm_head is None else {"lm_head.weight": lm_head})})
        c = config
        self.tied_embeddings = lm_head is None
        self.lm_head = Linear(weights["embed_tokens.weight"] if lm_head is None else lm_head, precision=precision)
        # [vocab, H]: rows are looked up (and widened to fp32 when stored in fp16 / int8); a tied
        # int8 table, or a tied fp32 one the LM head keeps in its plain layout, shares the head's rows
        embed = weights["embed_tokens.weight"]
        if precision == "int8":
            head = self.lm_head.int8
            self.embed = head.rows if self.tied_embeddings else Int8Rows.quantize(embed)
        elif self.tied_embeddings and self.lm_head.plain:
            self.embed = self.lm_head.weight
        else:
            self.embed = embed.half() if precision == "float16" else embed
        self.final_norm = weights["norm.weight"]
        self.layers = []
        for i in range(c.num_layers):
            w = lambda name: weights[f"layers.{i}.{name}"]  # noqa: E731
            qkv_bias = None
            if c.attention_bias:
                qkv_bias = torch.cat([w("self_attn.q_proj.bias"), w("self_attn.k_proj.bias"), w("self_attn.v_proj.bias")])
            layer = {
                "in_norm": w("input_layernorm.weight"),
                "post_norm": w("post_attention_layernorm.weight"),
                # Fused projections: one matmul for q|k|v and one for gate|up.
                "qkv": Linear(torch.cat([w("self_attn.q_proj.weight"), w("self_attn.k_proj.weight"), w("self_attn.v_proj.weight")]), qkv_bias, precision),
                # Llama's attention_bias also puts a bias on o_proj (Qwen2's does not): load what is stored
                "o": Linear(w("self_attn.o_proj.weight"), weights.get(f"layers.{i}.self_attn.o_proj.bias"), precision),
                "gate_up": None,
                "down": None,
                "moe": None,
                "q_norm": None,
                "k_norm": None,
                "sinks": w("self_attn.sinks") if c.attention_sinks else None,  # [heads]
                "window": c.sliding_window if i in c.sliding_layers else 0,
            }
            if i in c.sparse_layers and c.model_type == "gpt_oss":
                layer["moe"] = SparseMoE.from_gpt_oss_weights(w, c.num_experts_per_tok, c.swiglu_limit, c.swiglu_alpha, precision)
            elif i in c.sparse_layers:
                layer["moe"] = SparseMoE.from_weights(w, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob, precision)
            else:
                gate_up_bias = None
                if f"layers.{i}.mlp.gate_proj.bias" in weights:  # Llama's mlp_bias
                    gate_up_bias = torch.cat([w("mlp.gate_proj.bias"), w("mlp.up_proj.bias")])
                layer["gate_up"] = Linear(torch.cat([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")]), gate_up_bias, precision)
                layer["down"] = Linear(w("mlp.down_proj.weight"), weights.get(f"layers.{i}.mlp.down_proj.bias"), precision)
            if c.qk_norm:
                layer["q_norm"], layer["k_norm"] = w("self_attn.q_norm.weight"), w("self_attn.k_norm.weight")
            self.layers.append(layer)
        self._cos, self._sin = rope_tables(c, dtype)  # [max_pos, head_dim]
        # fused RMSNorm and q/k norm + rotary (engine/llm/csrc/decode_ops.cpp): the same arithmetic
        # in one call instead of ~20 torch operators; torch's where the kernels are not built
        self.ops = cpu_ops.load()[0] if dtype == torch.float32 else None

    @classmethod
    def from_pretrained(cls, path, config: TextConfig, dtype: torch.dtype = torch.float32, llm_weights: str = "float32") -> DecoderLM:
        check_llm_weights(llm_weights, dtype)  # before reading gigabytes
        weights = load_weights(path, "language_model.", dtype)
        lm_head = load_weights(path, "lm_head.", dtype, required=False).get("weight")
        return cls(config, weights, lm_head, dtype, llm_weights)

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.config, capacity, self.dtype)

    def _embed(self, seq: SequenceInput) -> torch.Tensor:
        # token_ids: [n] -> [n, H]; ids ≥ vocab_size index the prompt table
        ids = seq.token_ids
        fake = ids >= self.config.vocab_size
        if not bool(fake.any()):
            return self.embed[ids].to(self.dtype)
        if seq.prompt_table is None:
            raise ValueError("input_ids hold prompt-table ids but the request has no prompt table")
        rows = ids[fake] - self.config.vocab_size
        if int(rows.max()) >= seq.prompt_table.shape[0]:
            raise ValueError(
                f"input_ids index prompt-table row {int(rows.max())} but the table has {seq.prompt_table.shape[0]} rows"
            )
        x = self.embed[ids.masked_fill(fake, 0)].to(self.dtype)
        x[fake] = seq.prompt_table[rows].to(self.dtype)
        return x

    @torch.inference_mode()
    def forward(self, seqs: list[SequenceInput]) -> torch.Tensor:
        """Runs the new tokens of every sequence; -> logits [B, vocab] at each sequence's last token."""
        c = self.config
        lengths = [len(s.token_ids) for s in seqs]
        x = torch.cat([self._embed(s) for s in seqs])  # [N, H]
        positions = torch.cat([torch.arange(s.start, s.start + n) for s, n in zip(seqs, lengths)])
        cos, sin = self._cos[positions], self._sin[positions]  # [N, d]
        q_size = c.num_heads * c.head_dim
        for li, layer in enumerate(self.layers):
            h = self._norm(x, layer["in_norm"])
            q, k, v = self._rotated_qkv(layer["qkv"](h), layer, cos, sin)
            attn = torch.empty_like(q)
            fused_decode = self.ops is not None and not layer["window"] and layer["sinks"] is None
            offset = 0
            for s, n in zip(seqs, lengths):
                end = s.start + n
                if n == 1 and fused_decode:  # one token: cache write and attention in one call
                    attn[offset] = self.ops.attend_decode(q[offset], k[offset], v[offset], s.cache.k, s.cache.v, li, s.start)
                    offset += 1
                    continue
                s.cache.k[li, :, s.start : end] = k[offset : offset + n].transpose(0, 1)
                s.cache.v[li, :, s.start : end] = v[offset : offset + n].transpose(0, 1)
                attn[offset : offset + n] = self._attend(q[offset : offset + n], s.cache, li, s.start, end, layer["window"], layer["sinks"])
                offset += n
            x = x + layer["o"](attn.view(-1, q_size))
            h = self._norm(x, layer["post_norm"])
            if layer["moe"] is not None:
                x = x + layer["moe"](h)
            else:
                gate, up = layer["gate_up"](h).chunk(2, dim=-1)
                x = x + layer["down"](F.silu(gate) * up)
        last = torch.tensor(lengths).cumsum(0) - 1
        return self.lm_head(self._norm(x[last], self.final_norm))

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # x: [N, H] -> [N, H]
        if self.ops is not None:
            return self.ops.rms_norm(x, weight, self.config.rms_norm_eps)
        return _rms_norm(x, weight, self.config.rms_norm_eps)

    def _rotated_qkv(self, qkv: torch.Tensor, layer: dict, cos: torch.Tensor, sin: torch.Tensor):
        # qkv: [N, (heads + 2 kv_heads) d]; cos, sin: [N, d] -> q [N, heads, d], k and v [N, kv_heads, d]
        c = self.config
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        if self.ops is not None:  # per-head norm and rotary in place on q and k
            self.ops.norm_rope_qk_(qkv, cos, sin, layer["q_norm"], layer["k_norm"], c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps)
        q = qkv[:, :q_size].view(-1, c.num_heads, c.head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(-1, c.num_kv_heads, c.head_dim)
        v = qkv[:, q_size + kv_size :].view(-1, c.num_kv_heads, c.head_dim)
        if self.ops is None:
            if layer["q_norm"] is not None:
                q = _rms_norm(q, layer["q_norm"], c.rms_norm_eps)
                k = _rms_norm(k, layer["k_norm"], c.rms_norm_eps)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [N, 1, d]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        return q, k, v

    @staticmethod
    def _attend(
        q: torch.Tensor, cache: KVCache, layer: int, start: int, end: int, window: int = 0, sinks: torch.Tensor | None = None
    ) -> torch.Tensor:
        # q: [n, heads, d] at positions start..end-1 -> [n, heads, d]
        if window or sinks is not None:
            return _attend_sinks_window(q, cache, layer, start, end, window, sinks)
        n, heads, d = q.shape
        k, v = cache.k[layer, :, :end], cache.v[layer, :, :end]  # [kv_heads, end, d] views
        if n == 1:
            # Decode: two small grouped matmuls. CPU SDPA on cache views takes a slow path (~100× slower).
            kv_heads = k.shape[0]
            scores = torch.matmul(q.view(kv_heads, heads // kv_heads, d), k.transpose(1, 2)) * d**-0.5
            return torch.matmul(scores.softmax(-1), v).view(1, heads, d)
        # 4-D inputs reach the fused (flash) CPU kernel; 3-D ones fall back to the math path.
        if start == 0:
            mask, causal = None, True
        else:  # a chunk after cached tokens: causal within the chunk, full view of the past
            mask, causal = torch.ones(n, end, dtype=torch.bool).tril(start), False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, is_causal=causal, enable_gqa=True
        )
        return out[0].transpose(0, 1)


# Rows of scores per block in _attend_sinks_window (heads · queries · keys): bounds a long prefill's memory.
_SCORE_BLOCK = 1 << 24


def _attend_sinks_window(
    q: torch.Tensor, cache: KVCache, layer: int, start: int, end: int, window: int, sinks: torch.Tensor | None
) -> torch.Tensor:
    # q: [n, heads, d] at positions start..end-1; window 0 = full causal; sinks [heads] or None -> [n, heads, d]
    n, heads, d = q.shape
    first = max(0, start - window + 1) if window else 0  # the earliest key any query here may see
    k, v = cache.k[layer, :, first:end], cache.v[layer, :, first:end]  # [kv_heads, L, d]
    kv_heads = k.shape[0]
    groups = heads // kv_heads
    key_pos = torch.arange(first, end)
    out = torch.empty_like(q)
    block = max(1, _SCORE_BLOCK // (heads * k.shape[1]))
    for a in range(0, n, block):
        b = min(n, a + block)
        query_pos = torch.arange(start + a, start + b)[:, None]
        allowed = key_pos[None] <= query_pos  # [b-a, L]
        if window:
            allowed &= key_pos[None] > query_pos - window
        qg = q[a:b].view(b - a, kv_heads, groups, d).permute(1, 2, 0, 3)  # [kv_heads, groups, b-a, d]
        scores = torch.matmul(qg, k[:, None].transpose(-1, -2)) * d**-0.5  # [kv_heads, groups, b-a, L]
        scores = scores.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            sink = sinks.view(kv_heads, groups, 1, 1).expand(-1, -1, b - a, 1).to(scores.dtype)
            scores = torch.cat([scores, sink], dim=-1)
        probs = (scores - scores.amax(-1, keepdim=True)).softmax(-1)[..., : k.shape[1]]
        out[a:b] = torch.matmul(probs, v[:, None]).permute(2, 0, 1, 3).reshape(b - a, heads, d)
    return out
