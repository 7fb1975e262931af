"""Router: picks or blends prefix banks per input, plus the auxiliary losses that keep it healthy and a
check that tells when they did not (one expert took the load).

Axes: b - batch, m - feature width, e - experts, k - banks used per input.

The softmax runs in fp32 whatever the model dtype (as in Mixtral's router): routing decisions are
discrete and small logit errors in bf16 flip them. Top-k weights are renormalised over the chosen
banks, so they always sum to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PrefixConfig


class RouterOutput(NamedTuple):
    logits: Tensor  # (b e) fp32, before noise and temperature
    weights: Tensor  # (b e) dense routing weights, zero off the chosen banks
    indices: Tensor  # (b k) chosen banks, best first
    topk_weights: Tensor  # (b k) weights of the chosen banks, summing to one
    topk_log_weights: Tensor  # (b k) their logs, computed stably (used as attention biases by concat)
    balance_loss: Tensor  # scalar, Switch load balance (1.0 at perfect balance)
    z_loss: Tensor  # scalar, router z-loss
    aux_loss: Tensor  # scalar, balance_coef * balance_loss + z_coef * z_loss


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum is the sum of the gradients, all-reduced the same way."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _global_sum(x: Tensor, sync: bool) -> Tensor:
    """Sum over data-parallel processes when training under DDP; the identity otherwise."""
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _AllReduceSum.apply(x)
    return x


def load_balance_loss(
    probs: Tensor, indices: Tensor, num_experts: int, mask: Tensor | None = None, sync: bool = False
) -> Tensor:
    """Switch Transformer load balance: E * sum_e f_e * P_e.

    probs (b e) full router probabilities; indices (b k) chosen banks; mask (b) marks real examples
    (padding rows of a batch are ignored). f_e is the fraction of routing slots that went to e,
    P_e the mean probability given to e. Equals 1 when both are uniform, grows as load concentrates.
    With sync under data parallelism, f and P are computed over the global batch, so 2 processes on
    half batches give the loss (and, after DDP's gradient averaging, the gradient) of 1 process on all.
    """
    if mask is None:
        mask = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    mask = mask.to(probs.dtype)
    counts = F.one_hot(indices, num_experts).to(probs.dtype).sum(1)  # (b e)
    n = _global_sum(mask.sum().detach(), sync).clamp_min(1)
    fraction = _global_sum((counts * mask[:, None]).sum(0).detach(), sync) / (n * indices.shape[1])
    mean_prob = _global_sum((probs * mask[:, None]).sum(0), sync) / n
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """ST-MoE z-loss: mean of logsumexp(logits)^2; keeps router logits small so the softmax stays sane."""
    z = torch.logsumexp(logits.float(), dim=-1) ** 2
    if mask is None:
        return z.mean()
    mask = mask.to(z.dtype)
    return (z * mask).sum() / mask.sum().clamp_min(1)


@dataclass(frozen=True)
class CollapseReport:
    """Whether one expert takes at least ``threshold`` of the load. Truthy when collapsed."""

    collapsed: bool
    expert: int  # the most loaded expert, collapsed or not
    share: float  # its share of the load

    def __bool__(self) -> bool:
        return self.collapsed


def detect_collapse(load: Any, threshold: float = 0.9) -> CollapseReport:
    """Report whether a single expert takes at least ``threshold`` of ``load`` (e), fractions or counts.

    ``load`` is a tensor, numpy array or list. The report is truthy when collapsed, so
    ``if detect_collapse(load): warn(...)`` works; it also names the most loaded expert (``report.expert``,
    which may be 0: test the report, not the index).
    """
    # float64 on CPU whatever the input: a bf16 share of 0.9 is not 0.9, and training and the report must agree.
    lo = torch.as_tensor(load).detach().to("cpu", torch.float64)
    if lo.ndim != 1 or lo.numel() == 0 or (lo < 0).any() or lo.sum() <= 0:
        raise ValueError("load must be a non-empty 1-D array of non-negative values with positive sum")
    share = lo / lo.sum()
    top = int(share.argmax())
    return CollapseReport(bool(share[top] >= threshold), top, float(share[top]))


class Router(nn.Module):
    """Maps per-input features (b m) to a RouterOutput."""

    def __init__(self, feature_dim: int, cfg: PrefixConfig, normalize: bool = True):
        super().__init__()
        self.cfg = cfg
        # Features are means of frozen embeddings whose scale varies by model; a parameter-free
        # LayerNorm makes the initial logit scale model-independent.
        self.norm = nn.LayerNorm(feature_dim, elementwise_affine=False) if normalize else nn.Identity()
        self.proj = nn.Linear(feature_dim, cfg.num_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, features: Tensor) -> RouterOutput:
        cfg = self.cfg
        logits = self.proj(self.norm(features.to(self.proj.weight.dtype))).float()
        probs = torch.softmax(logits / cfg.temperature, dim=-1)
        if cfg.k == cfg.num_experts:
            # Dense routing: every bank, in bank order, so concat places banks at fixed positions.
            indices = torch.arange(cfg.num_experts, device=logits.device).expand(logits.shape[0], -1)
            log_w = torch.log_softmax(logits / cfg.temperature, dim=-1)
            weights = probs
        else:
            noisy = logits
            if self.training and cfg.router_noise > 0:
                noisy = logits + torch.randn_like(logits) * cfg.router_noise
            top, indices = noisy.topk(cfg.k, dim=-1)
            log_w = torch.log_softmax(top / cfg.temperature, dim=-1)
            if cfg.k == 1:
                # A single renormalised weight is always 1 and passes no gradient to the router.
                # Straight-through: the value stays 1, the gradient is that of log p (as in Switch,
                # where the output is scaled by the chosen expert's probability).
                log_p = torch.log_softmax(noisy / cfg.temperature, dim=-1).gather(-1, indices)
                log_w = log_p - log_p.detach()
            weights = torch.zeros_like(probs).scatter(-1, indices, log_w.exp())
        balance = load_balance_loss(probs, indices, cfg.num_experts, sync=self.training)
        z = router_z_loss(logits)
        aux = cfg.balance_coef * balance + cfg.z_coef * z
        return RouterOutput(logits, weights, indices, log_w.exp(), log_w, balance, z, aux)
