"""A port of InternVL3.5-Flash's generate_flash, written for the tests (independent of engine/).

From the Flash models' remote code `modeling_internvl_chat.py` (as lmdeploy's
`pytorch/models/internvl.py` also ports it): `extract_feature_flash` runs the tower, drops CLS, scores
each tile with `gating(pooling_before_gating(tokens))` — CrossAttentionPooling: a learned query,
nn.MultiheadAttention attn1 → norm1, then attn2 → norm2 three times (16 heads, q/k/v from
in_proj_weight thirds, out_proj), Gating: four residual blocks x + LN(fc2(GELU(fc1 x))) then LN →
Linear(C, 2) → softmax — and computes both paths: mlp1(pixel_shuffle(0.5)) [256 tokens] and
mlp2(pixel_shuffle(0.25)) [64 tokens]; `generate_flash` takes torch.quantile of the gate's column 0
over the call's tiles at flash_relative_threshold, compresses a tile when its score is > that and ≥
flash_absolute_threshold, and `compress_visual_tokens_in_sentence` keeps only the first 64 of each
compressed tile's 256 IMG_CONTEXT positions before the embeddings are scattered in tile order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.reference_custom_chat import CustomInternVL

HEADS = 16


class FlashInternVL(CustomInternVL):
    def _ln(self, x, prefix):
        return F.layer_norm(x, x.shape[-1:], self.w[prefix + ".weight"], self.w[prefix + ".bias"], 1e-5)

    def _linear(self, x, prefix):
        return F.linear(x, self.w[prefix + ".weight"], self.w[prefix + ".bias"])

    def _mha(self, query, tokens, prefix):
        # nn.MultiheadAttention(batch_first=True) written out: query [T, 1, C], tokens [T, L, C]
        w, b = self.w[prefix + ".in_proj_weight"], self.w[prefix + ".in_proj_bias"]
        wq, wk, wv = w.chunk(3)
        bq, bk, bv = b.chunk(3)
        t, l, c = tokens.shape
        d = c // HEADS
        q = F.linear(query, wq, bq).view(t, 1, HEADS, d).transpose(1, 2)
        k = F.linear(tokens, wk, bk).view(t, l, HEADS, d).transpose(1, 2)
        v = F.linear(tokens, wv, bv).view(t, l, HEADS, d).transpose(1, 2)
        attn = ((q @ k.transpose(-1, -2)) / d**0.5).softmax(-1)
        return self._linear((attn @ v).transpose(1, 2).reshape(t, 1, c), prefix + ".out_proj")

    def gate(self, tokens):
        # tokens: [T, L, C] -> column 0 of the gate's softmax [T]
        p = "pooling_before_gating."
        x = self.w[p + "query_token"].expand(tokens.shape[0], 1, -1)
        x = self._ln(self._mha(x, tokens, p + "attn1"), p + "norm1")
        for _ in range(3):  # the remote code's forward reuses attn2 / norm2
            x = self._ln(self._mha(x, tokens, p + "attn2"), p + "norm2")
        x = x[:, 0]
        for i in range(1, 5):
            b = f"gating.block{i}."
            x = x + self._ln(self._linear(F.gelu(self._linear(x, b + "0")), b + "3"), b + "5")
        return self._linear(self._ln(x, "gating.gate.0"), "gating.gate.1").softmax(-1)[:, 0]

    @torch.no_grad()
    def extract_feature_flash(self, pixel_values):
        # -> (256-token features [T, 256, H], 64-token features [T, 64, H], gate [T])
        vit = self.vision_hidden_states(pixel_values)[-1][:, 1:, :]
        t, n, c = vit.shape
        side = int(n**0.5)
        grid = vit.reshape(t, side, side, c)
        x = self.pixel_shuffle(grid, 0.25).reshape(t, -1, c * 16)
        x = self._linear(F.gelu(self._linear(F.gelu(self._linear(self._ln(x, "mlp2.0"), "mlp2.1")), "mlp2.4")), "mlp2.7")
        return self.extract_feature(pixel_values), x, self.gate(vit)

    def route(self, gate):
        cfg = self.config
        threshold = torch.quantile(gate.float(), cfg["flash_relative_threshold"])
        return (gate > threshold) & (gate >= cfg["flash_absolute_threshold"])

    @torch.no_grad()
    def generate(self, query, pixel_values, stop_token_id, max_new_tokens):
        """Greedy generate_flash -> (new token ids without the stop token, min top-1/top-2 logit margin)."""
        if pixel_values is None:
            return super().generate(query, None, stop_token_id, max_new_tokens)
        ids = self.tokenizer(query, return_tensors="pt").input_ids[0]
        full, small, gate = self.extract_feature_flash(torch.from_numpy(pixel_values))
        compress = self.route(gate)
        self.last_compress = compress
        context = self.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        keep = torch.ones(len(ids), dtype=torch.bool)
        tile, i = 0, 0
        while i < len(ids):  # each run of context tokens: one image, 256 positions per tile
            if ids[i] != context:
                i += 1
                continue
            start = i
            while i < len(ids) and ids[i] == context:
                i += 1
            assert (i - start) % 256 == 0
            for block in range(start, i, 256):
                if compress[tile]:
                    keep[block + 64 : block + 256] = False
                tile += 1
        ids = ids[keep]
        features = torch.cat([small[j] if compress[j] else full[j] for j in range(len(compress))])
        embeds = self.llm.get_input_embeddings()(ids[None])
        embeds[0, ids == context] = features
        return self._greedy(embeds, stop_token_id, max_new_tokens)
