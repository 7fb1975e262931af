"""Prefix banks: E experts, each a set of key/value vectors for every attention layer.

Axes: e - experts, l - layers, c - key/value (0 keys, 1 values), h - key/value heads, p - prefix
positions, d - head dim, b - batch, k - banks used per input, r - reparameterisation width.

Keys are stored as they enter attention (after any rotary embedding, which prefixes never get), with
the backbone's key/value head count so grouped-query models share them across query heads exactly as
they share their own keys.

Reparameterisation (Li & Liang 2021; Le et al. 2025): in training, the bank is the output of an MLP
over small per-position embeddings, which shares structure between keys, values and layers and makes
optimisation more stable. `fold()` replaces the MLP by the tensor it produces, for inference/export.

Factorised experts (prefix.expert_rank = r > 0; MPT, Wang et al. ICLR 2023): expert e is one base prefix
times a per-expert factor, base ⊙ (1 + U_e V_e), U_e (p r) and V_e (r l c h d). The base trains on every
input, so splitting the data between experts no longer starves what they share; each expert's own part is
r · (p + l·c·h·d) numbers, few enough to learn from its share of the data. U starts at zero: every expert
begins as the base, a single prefix. `fold()` replaces the factors by the tensor they produce.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from .config import BackboneDims, PrefixConfig


class PrefixBank(nn.Module):
    def __init__(self, cfg: PrefixConfig, dims: BackboneDims, shared: bool = False):
        """shared=True: the one bank of cfg.shared_len positions beside the routed ones (same init and MLP)."""
        super().__init__()
        self.cfg, self.dims = cfg, dims
        self.num_experts, self.prefix_len = (1, cfg.shared_len) if shared else (cfg.num_experts, cfg.prefix_len)
        shape = (self.num_experts, dims.num_layers, 2, dims.num_kv_heads, self.prefix_len, dims.head_dim)
        if cfg.expert_rank and not shared:
            E, L, _, H, P, D = shape
            self.base = nn.Parameter(torch.randn(shape[1:]) * cfg.init_std)  # (l c h p d)
            self.factor_rows = nn.Parameter(torch.zeros(E, P, cfg.expert_rank))  # U (e p r)
            self.factor_cols = nn.Parameter(torch.randn(E, cfg.expert_rank, L, 2, H, D))  # V (e r l c h d)
            self.kv = None
        elif cfg.reparam:
            self.embedding = nn.Parameter(torch.randn(self.num_experts, self.prefix_len, cfg.reparam_dim))
            out = dims.num_layers * 2 * dims.num_kv_heads * dims.head_dim
            self.mlp = nn.Sequential(
                nn.Linear(cfg.reparam_dim, cfg.reparam_hidden), nn.Tanh(), nn.Linear(cfg.reparam_hidden, out)
            )
            nn.init.normal_(self.mlp[2].weight, std=cfg.init_std / cfg.reparam_hidden**0.5)
            nn.init.zeros_(self.mlp[2].bias)
            self.kv = None
        else:
            self.kv = nn.Parameter(torch.randn(shape) * cfg.init_std)

    @property
    def folded(self) -> bool:
        return self.kv is not None

    def tensor(self) -> Tensor:
        """The whole bank, (e l c h p d)."""
        if self.kv is not None:
            return self.kv
        if hasattr(self, "base"):
            factor = torch.einsum("epr,erlchd->elchpd", self.factor_rows, self.factor_cols)
            return self.base * (1 + factor)
        flat = self.mlp(self.embedding)  # (e p (l c h d))
        d = self.dims
        return rearrange(flat, "e p (l c h d) -> e l c h p d", l=d.num_layers, c=2, h=d.num_kv_heads)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the reparameterisation MLP, or the expert factors, by the plain tensor they produce (outputs
        unchanged)."""
        if self.kv is None:
            self.kv = nn.Parameter(self.tensor().detach().clone())
            for name in ("mlp", "embedding", "base", "factor_rows", "factor_cols"):
                if hasattr(self, name):
                    delattr(self, name)

    @torch.no_grad()
    def upcycle(self, source: Tensor, noise: float, seed: int) -> None:
        """Every expert := the one-expert prefix source (l c h p d) + N(0, (noise * std(source))^2), seeded.

        Sparse upcycling (Komatsuzaki et al., ICLR 2023): experts start from a trained dense prefix and then
        specialise; the noise breaks their symmetry so the router's gradients can tell them apart.
        """
        if self.kv is None:
            raise ValueError("cannot upcycle into a reparameterised bank: use prefix.reparam=false")
        if source.shape != self.kv.shape[1:]:
            raise ValueError(
                f"the source prefix has shape {tuple(source.shape)} (l c h p d); each expert of this bank has "
                f"{tuple(self.kv.shape[1:])}: train the source with the same prefix_len and backbone"
            )
        generator = torch.Generator().manual_seed(seed)
        std = noise * source.float().std().item()
        draws = torch.randn(self.kv.shape, generator=generator, dtype=torch.float32) * std
        self.kv.copy_(source.float().expand_as(self.kv) + draws)

    @torch.no_grad()
    def set_from_activations(self, kv: Tensor) -> None:
        """Initialise from real tokens' keys/values, kv (e l c h p d) (Li & Liang: helps in low data)."""
        if self.kv is None:
            raise ValueError("cannot set bank tensors while reparameterised; fold() first")
        self.kv.copy_(kv.to(self.kv))

    def _kept(self, keep: int | None) -> Tensor:
        """The bank cut to its first `keep` positions before anything per-example is built."""
        bank = self.tensor()
        return bank if keep is None or keep >= bank.shape[-2] else bank[..., :keep, :]

    def blend(self, weights: Tensor, indices: Tensor, keep: int | None = None) -> Tensor:
        """Weighted sum of the chosen banks: weights, indices (b k) -> (b l c h p d), p = keep or P."""
        bank = self._kept(keep)
        if self.num_experts <= 2 * indices.shape[1]:
            # Few banks: one (b e) x (e n) matmul. No (b k n) gather, and its backward is one matmul
            # instead of an index_put into a zero-filled (e n) gradient.
            dense = torch.zeros(weights.shape[0], self.num_experts, device=weights.device, dtype=bank.dtype)
            dense.scatter_(1, indices, weights.to(bank.dtype))
            return torch.einsum("be,elchpd->blchpd", dense, bank)
        chosen = bank[indices]  # (b k l c h p d)
        return torch.einsum("bk,bklchpd->blchpd", weights.to(chosen.dtype), chosen)

    def gather(self, indices: Tensor, keep: int | None = None) -> Tensor:
        """The chosen banks side by side: indices (b k) -> (b k l c h p d), p = keep or P."""
        return self._kept(keep)[indices]
