"""The InternVL3.5-Flash vision encoder: the usual tower and 256-token projector, plus the router's
modules and the 64-token projector, computed for every tile (the routing itself is engine/flash.py).

Modules as the Flash models' remote code `modeling_internvl_chat.py` builds them (weights
`pooling_before_gating.*`, `gating.*`, `mlp2.*`; LayerNorm eps 1e-5, exact GELU):
- `CrossAttentionPooling(dim=C, num_heads=16)`: one learned query attends over a tile's patch tokens
  (the tower's last layer, CLS dropped, before pixel shuffle) with attn1 → norm1, then attn2 → norm2
  three times — the reference's forward reuses attn2/norm2 and never runs attn3/attn4/norm3/norm4
  (lmdeploy's port does the same), so neither do we; no residuals, no feed-forward.
- `Gating(C, expansion 4)`: four blocks x = x + LN(Linear(GELU(Linear(x)))), then LN → Linear(C, 2)
  → softmax; column 0 is the "compress" probability.
- `mlp2`: LN(16C) → Linear(16C, 2H) → GELU → Linear(2H, 2H) → GELU → Linear(2H, H) on the pixel
  shuffle at scale 1/4 of the same patch grid (64 tokens per 448 tile).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.vision import VisionEncoderModule
from engine.weights import load_weights

POOLING_HEADS = 16  # CrossAttentionPooling(dim=vit_hidden_size, num_heads=16) in the remote code
EPS = 1e-5


class CrossAttentionPooling(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_token = nn.Parameter(torch.zeros(1, dim))
        for i in range(1, 5):  # attn3/4 and norm3/4 exist in the checkpoint; the forward skips them
            setattr(self, f"attn{i}", nn.MultiheadAttention(dim, POOLING_HEADS, batch_first=True))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=EPS))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [T, L, C] -> [T, C]
        x = self.query_token.expand(tokens.shape[0], 1, -1)
        x = self.norm1(self.attn1(x, tokens, tokens, need_weights=False)[0])
        for _ in range(3):
            x = self.norm2(self.attn2(x, tokens, tokens, need_weights=False)[0])
        return x[:, 0]


class Gating(nn.Module):
    def __init__(self, dim: int, expansion: int = 4):
        super().__init__()
        for i in range(1, 5):
            block = nn.Sequential(
                nn.Linear(dim, dim * expansion), nn.GELU(), nn.Identity(), nn.Linear(dim * expansion, dim), nn.Identity(), nn.LayerNorm(dim, eps=EPS)
            )  # Identity where the reference has Dropout: the weight indices stay 0, 3, 5
            setattr(self, f"block{i}", block)
        self.gate = nn.Sequential(nn.LayerNorm(dim, eps=EPS), nn.Linear(dim, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, C] -> "compress" probability [T]
        for i in range(1, 5):
            x = x + getattr(self, f"block{i}")(x)
        return self.gate(x).softmax(-1)[:, 0]


def compressed_projector(vision_hidden: int, text_hidden: int) -> nn.Sequential:
    # indices as the checkpoint's mlp2.0 / .1 / .4 / .7 (Dropout -> Identity)
    return nn.Sequential(
        nn.LayerNorm(vision_hidden * 16, eps=EPS),
        nn.Linear(vision_hidden * 16, text_hidden * 2),
        nn.GELU(),
        nn.Identity(),
        nn.Linear(text_hidden * 2, text_hidden * 2),
        nn.GELU(),
        nn.Identity(),
        nn.Linear(text_hidden * 2, text_hidden),
    )


class FlashVisionEncoderModule(VisionEncoderModule):
    """-> (table [T·Q, H] of the 256-token path, compressed [T·q, H] of the 64-token path, gate [T])."""

    def add_router(self, config) -> FlashVisionEncoderModule:
        c, h = config.vision.hidden_size, config.text.hidden_size
        self.pooling = CrossAttentionPooling(c)
        self.gating = Gating(c)
        self.compressed_projector = compressed_projector(c, h)
        for module, prefix in ((self.pooling, "pooling_before_gating."), (self.gating, "gating."), (self.compressed_projector, "mlp2.")):
            module.load_state_dict(load_weights(config.path, prefix))
        return self.eval()

    def forward(self, pixel_values: torch.Tensor):
        grid = self.patch_grid(pixel_values)  # [T, side, side, C]
        tiles = grid.shape[0]
        gate = self.gating(self.pooling(grid.reshape(tiles, -1, grid.shape[-1])))
        table = self.project(grid, self.scale, self.projector)
        compressed = self.project(grid, self.scale * 2, self.compressed_projector)
        return table, compressed, gate.float()
