"""Qwen3-MoE's sparse MLP on the flat token batch of a step (shared across the in-flight batch).

Follows transformers 5.23 `models/qwen3_moe/modeling_qwen3_moe.py` (Qwen3MoeTopKRouter: softmax in
float32, top-k, renormalised when `norm_topk_prob`) and the expert arithmetic of its default
experts implementation, `integrations/moe.py: grouped_mm_experts_forward` (each (token, slot)
pair's expert output times its routing weight, then a sum over the k slots in slot order).

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
        norm_topk_prob: bool,
    ):
        self.router = Linear(router)
        self.gate_up = [Linear(w) for w in gate_up]
        self.down = [Linear(w) for w in down]
        self.num_experts = len(gate_up)
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.last_tokens_per_expert: torch.Tensor | None = None  # int64 [E] of the last call (observability)

    @classmethod
    def from_weights(cls, w, num_experts: int, top_k: int, norm_topk_prob: bool) -> SparseMoE:
        """w(name) -> tensor under `layers.{i}.`; names as engine/weights.py canonicalises them."""
        experts = [f"mlp.experts.{e}." for e in range(num_experts)]
        gate_up = [torch.cat([w(e + "gate_proj.weight"), w(e + "up_proj.weight")]) for e in experts]
        down = [w(e + "down_proj.weight") for e in experts]
        return cls(w("mlp.gate.weight"), gate_up, down, top_k, norm_topk_prob)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [N, H] -> routing weights [N, k] (x's dtype), expert ids int64 [N, k]
        logits = self.router(x)
        probs = logits.softmax(-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(x.dtype), experts

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
            gate, up = self.gate_up[e](x[rows // k]).chunk(2, dim=-1)
            out[rows] = self.down[e](F.silu(gate) * up)
        return (out.view(n, k, -1) * weights.unsqueeze(-1)).sum(1)
