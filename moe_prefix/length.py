"""Per-input prefix lengths.

Axes: b - batch, k - banks used per input, p - prefix positions, m - feature width.

A length l gives prefix position i the mask m_i = 1[i < round(l)] at evaluation. In training the
hard step has no gradient, so the mask is the sigmoid sigma((l - i - 0.5) / tau), applied inside
attention as the additive bias log m_i: an attention logit plus log m_i multiplies that position's
unnormalised weight by m_i, i.e. a soft "partial presence" of the position. A length cost
(mean l / P) pulls lengths down against the task loss. At evaluation the keys/values are truncated to
the longest prefix in the batch, so shorter prefixes really cost less compute.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .config import PrefixConfig
from .router import RouterOutput


class LengthOutput(NamedTuple):
    lengths: Tensor  # (b k) length of each chosen bank's prefix (all equal per row unless length="expert")
    log_mask: Tensor | None  # (b k p_kept) additive attention bias, None when every position is fully present
    keep: int  # positions kept per bank (P in training, the batch's longest prefix at evaluation)
    cost: Tensor  # scalar, length_cost * mean(l) / P


class LengthController(nn.Module):
    def __init__(self, feature_dim: int, cfg: PrefixConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.length == "learned":
            self.head = nn.Sequential(nn.LayerNorm(feature_dim, elementwise_affine=False), nn.Linear(feature_dim, 1))
            nn.init.zeros_(self.head[1].weight)
            # Start near the full length: sigma(2) = 0.88 of the range, so training first learns what
            # the prefix should say and only then how much of it can go.
            nn.init.constant_(self.head[1].bias, 2.0)
        if cfg.length == "expert":
            self.register_buffer("expert_lengths", torch.tensor(cfg.expert_lengths, dtype=torch.float32))

    def forward(self, features: Tensor, routing: RouterOutput, combine: str) -> LengthOutput:
        cfg = self.cfg
        b, k = routing.indices.shape
        P = cfg.prefix_len
        zero = features.new_zeros((), dtype=torch.float32)
        if cfg.length == "fixed":
            lengths = torch.full((b, k), float(P), device=features.device)
            return LengthOutput(lengths, None, P, zero)
        if cfg.length == "learned":
            z = self.head(features.to(self.head[1].weight.dtype)).float().squeeze(-1)  # (b)
            length = cfg.min_len + (P - cfg.min_len) * torch.sigmoid(z)
            lengths = length[:, None].expand(b, k)
            cost = cfg.length_cost * length.mean() / P
        else:  # expert: each bank has its own fixed length
            per_bank = self.expert_lengths[routing.indices]  # (b k)
            if combine == "blend":
                # A blended prefix has one length: the routing-weighted mean of the chosen banks' lengths.
                per_bank = (routing.topk_weights * per_bank).sum(-1, keepdim=True).expand(b, k)
            lengths, cost = per_bank, zero
        return self.mask(lengths, cost)

    def mask(self, lengths: Tensor, cost: Tensor) -> LengthOutput:
        """Build the log-mask for lengths (b k): soft in training, hard and truncated at evaluation."""
        P = self.cfg.prefix_len
        if self.training:
            i = torch.arange(P, device=lengths.device, dtype=torch.float32)
            m = torch.sigmoid((lengths[..., None] - i - 0.5) / self.cfg.length_tau)
            return LengthOutput(lengths, torch.log(m.clamp_min(1e-12)), P, cost)
        hard = lengths.round()
        keep = int(hard.max().item()) if hard.numel() else 0
        i = torch.arange(keep, device=lengths.device, dtype=torch.float32)
        present = i < hard[..., None]  # (b k keep)
        if bool(present.all()):
            return LengthOutput(hard, None, keep, cost)
        log_mask = torch.zeros(present.shape, device=lengths.device).masked_fill(~present, float("-inf"))
        return LengthOutput(hard, log_mask, keep, cost)
