"""Amphista heads (arXiv 2406.13170): non-autoregressive drafting heads that see each other.

Medusa's head k guesses token t+k+2 from h_t alone, blind to what the other heads guess
and to the token t+1 the target just chose. Amphista adds, before the shared frozen
output projection:

  Staged Adaptation Layers: h_t and the target's embedding of token t+1 are adapted in
    two residual stages, s1 = h + SiLU(A1 [h; e] + a1) and s2 = s1 + SiLU(A2 s1 + a2).
    The near heads read s1, the far heads the further-adapted s2: the target's features
    are built to predict one token ahead, and the further a head looks the more they need
    reshaping.
  Auto-embedding Block: the K head positions (their stage features projected to a small
    width, plus a learned position embedding each) go through one bidirectional
    transformer block over the K positions, so head k conditions on what the others are
    about to say; its output, projected back up, is added to each head's features.
  Heads: then each head's own residual block (Medusa's), and the shared output rows.

Sizes for a 1536-wide target: A1 (2d x d) + A2 (d x d) + a 512-wide block (8 attention
heads, MLP 2x) + K d x d head blocks ~ 20M parameters (Medusa's 4 heads: 9.4M); per step
the K x H product through the hot output rows still dominates (BENCHMARKS.md, heads
cost). A first version without per-head blocks (10.7M) shared too much between heads
and trained to lower accuracy than Medusa. Every layer that writes into the residual
stream starts at zero, so fresh heads start as the lm_head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actors.heads import DraftHeads, HeadsConfig, head_blocks

STAGES = 2
HEAD_DIM = 64  # per attention head in the auto-embedding block


class AutoEmbeddingBlock(nn.Module):
    """One pre-norm transformer block over the K head positions, attending both ways."""

    def __init__(self, width: int, n_positions: int):
        super().__init__()
        self.n_att = max(1, width // HEAD_DIM)
        self.position = nn.Parameter(torch.randn(n_positions, width) * 0.02)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, K, w] -> [B, K, w]."""
        B, K, w = x.shape
        x = x + self.position
        q, k, v = self.qkv(self.norm1(x)).view(B, K, 3, self.n_att, w // self.n_att).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v)  # no mask: every head sees every other
        x = x + self.out(att.transpose(1, 2).reshape(B, K, w))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class AmphistaHeads(DraftHeads):
    uses_token = True

    def __init__(self, cfg: HeadsConfig, hot_ids: Tensor, hot_rows: Tensor):
        super().__init__(cfg, hot_ids, hot_rows)
        d, w, k = cfg.hidden_size, cfg.width, cfg.n_heads
        self.stage1 = nn.Linear(2 * d, d)
        self.stage2 = nn.Linear(d, d)
        self.to_block = nn.Linear(d, w, bias=False)
        self.block = AutoEmbeddingBlock(w, k)
        self.from_block = nn.Linear(w, d, bias=False)
        self.head_weight = nn.Parameter(torch.zeros(k, d, d))  # each head's own block, as Medusa's
        self.head_bias = nn.Parameter(torch.zeros(k, d))
        for layer in (self.stage1, self.stage2, self.from_block):  # residual writers start at zero
            nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        # head k reads stage 1 + (k * STAGES) // K: near heads the first stage, far heads the second
        self.register_buffer("stage_of_head", torch.tensor([(i * STAGES) // k for i in range(k)]), persistent=False)

    def features(self, hidden: Tensor, embedded: Tensor | None = None) -> Tensor:
        """hidden [B, d], embedded [B, d] -> [K, B, d]."""
        if embedded is None:
            raise ValueError("amphista heads need the embedding of the newest token")
        dtype = self.stage1.weight.dtype
        h, e = hidden.to(dtype), embedded.to(dtype)
        e = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6)  # embedding rows are tiny beside h: unit RMS
        s1 = h + F.silu(self.stage1(torch.cat([h, e], -1)))
        s2 = s1 + F.silu(self.stage2(s1))
        staged = torch.stack([s1, s2], 1)[:, self.stage_of_head]  # [B, K, d]
        x = (staged + self.from_block(self.block(self.to_block(staged)))).transpose(0, 1)  # [K, B, d]
        return head_blocks(x, self.head_weight, self.head_bias)
