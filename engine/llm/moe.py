"""The sparse MLP of Qwen3-MoE and GPT-OSS on the flat token batch of a step (shared across the
in-flight batch).

Follows transformers 5.23 `models/qwen3_moe/modeling_qwen3_moe.py` (Qwen3MoeTopKRouter: softmax in
float32, top-k, renormalised when `norm_topk_prob`) and the expert arithmetic of its default
experts implementation, `integrations/moe.py: grouped_mm_experts_forward` (each (token, slot)
pair's expert output times its routing weight, then a sum over the k slots in slot order).
GPT-OSS (`models/gpt_oss/modeling_gpt_oss.py`): the router is a Linear with bias, top-k on its
logits, softmax over those k; experts carry biases and a clamped SwiGLU (GptOssExperts._apply_gate:
gate ≤ limit, up in [-limit, limit], (up + 1) · gate · sigmoid(alpha · gate)); their fused weights
are stored transposed (`gate_up_proj` [E, H, 2I] with gate and up interleaved column by column,
`down_proj` [E, I, H]) and are rearranged here once into the Linear layout.

Every token of the step — all prompts being prefilled and all sequences being decoded — is routed
at once; each expert that any token chose then runs once, one gathered matmul over exactly the
rows that chose it, so an expert's weights are read once per step whatever the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.llm.linear import Linear


class SparseMoE:
    def __init__(
        self,
        router: torch.Tensor,  # [E, H]
        gate_up: list[torch.Tensor],  # per expert [2I, H]: gate rows, then up rows
        down: list[torch.Tensor],  # per expert [H, I]
        top_k: int,
        norm_topk_prob: bool = False,
        router_bias: torch.Tensor | None = None,  # [E] (gpt_oss)
        gate_up_bias: list[torch.Tensor] | None = None,  # per expert [2I] (gpt_oss)
        down_bias: list[torch.Tensor] | None = None,  # per expert [H] (gpt_oss)
        swiglu: tuple[float, float] | None = None,  # gpt_oss (limit, alpha); None: silu(gate) · up
        precision: str = "float32",  # experts' weights (the router stays fp32: engine/llm/precision.py)
    ):
        self.router = Linear(router, router_bias)
        no_bias = [None] * len(gate_up)
        self.gate_up = [Linear(w, b, precision) for w, b in zip(gate_up, gate_up_bias or no_bias)]
        self.down = [Linear(w, b, precision) for w, b in zip(down, down_bias or no_bias)]
        self.num_experts = len(gate_up)
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.swiglu = swiglu
        self.last_tokens_per_expert: torch.Tensor | None = None  # int64 [E] of the last call (observability)

    @classmethod
    def from_weights(cls, w, num_experts: int, top_k: int, norm_topk_prob: bool, precision: str = "float32") -> SparseMoE:
        """w(name) -> tensor under `layers.{i}.`; names as engine/weights.py canonicalises them."""
        experts = [f"mlp.experts.{e}." for e in range(num_experts)]
        gate_up = [torch.cat([w(e + "gate_proj.weight"), w(e + "up_proj.weight")]) for e in experts]
        down = [w(e + "down_proj.weight") for e in experts]
        return cls(w("mlp.gate.weight"), gate_up, down, top_k, norm_topk_prob, precision=precision)

    @classmethod
    def from_gpt_oss_weights(cls, w, top_k: int, limit: float, alpha: float, precision: str = "float32") -> SparseMoE:
        gate_up = w("mlp.experts.gate_up_proj")  # [E, H, 2I], columns gate0, up0, gate1, up1, …
        gate_up_bias = w("mlp.experts.gate_up_proj_bias")  # [E, 2I], same order
        rows = lambda t: torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)  # noqa: E731  gate block, then up block
        return cls(
            w("mlp.router.weight"),
            list(rows(gate_up).transpose(1, 2).contiguous()),  # per expert [2I, H]
            list(w("mlp.experts.down_proj").transpose(1, 2).contiguous()),  # per expert [H, I]
            top_k,
            router_bias=w("mlp.router.bias"),
            gate_up_bias=list(rows(gate_up_bias)),
            down_bias=list(w("mlp.experts.down_proj_bias")),
            swiglu=(limit, alpha),
            precision=precision,
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [N, H] -> routing weights [N, k] (x's dtype), expert ids int64 [N, k]
        logits = self.router(x)
        if self.swiglu is not None:  # gpt_oss: softmax over the k largest logits
            top, experts = logits.topk(self.top_k, dim=-1)
            return top.softmax(-1), experts
        probs = logits.softmax(-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(x.dtype), experts

    def _activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        # gate_up: [n, 2I] -> [n, I]
        gate, up = gate_up.chunk(2, dim=-1)
        if self.swiglu is None:
            return F.silu(gate) * up
        limit, alpha = self.swiglu
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, H] -> [N, H]
        n, k = x.shape[0], self.top_k
        weights, experts = self.route(x)
        pairs = experts.flatten()  # [N·k]: (token, slot) pair p = token·k + slot
        order = pairs.argsort(stable=True)  # pairs grouped by expert
        counts = torch.bincount(pairs, minlength=self.num_experts)
        self.last_tokens_per_expert = counts
        out = x.new_empty(n * k, x.shape[1])
        start = 0
        for e, count in enumerate(counts.tolist()):
            if not count:
                continue
            rows = order[start : start + count]
            start += count
            out[rows] = self.down[e](self._activate(self.gate_up[e](x[rows // k])))
        return (out.view(n, k, -1) * weights.unsqueeze(-1)).sum(1)
