"""Router: picks or blends prefix banks per input, plus the auxiliary losses that keep it healthy and a
check that tells when they did not (one expert took the load).

Axes: b - batch, m - feature width, e - experts, k - banks used per input.

The softmax runs in fp32 whatever the model dtype (as in Mixtral's router): routing decisions are
discrete and small logit errors in bf16 flip them. Top-k weights are renormalised over the chosen
banks, so they always sum to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PrefixConfig

KMEANS_MARGIN = 2.0  # mean best-vs-second logit gap of a fresh k-means router, in nats
BY_GROUP_GAP = 30.0  # logit gap between a group's own expert and the others (router_init=by_group), in nats


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


def kmeans(x: Tensor, k: int, seed: int = 0, iters: int = 50) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ seeding: x (n m) -> centroids (k m), assignment (n).

    Deterministic given the seed (its own generator; the global random state is untouched). A cluster
    that empties keeps its previous centroid.
    """
    x = x.detach().double()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    centroids = x[torch.randint(n, (1,), generator=g)]
    for _ in range(1, k):  # k-means++: the next centre with probability proportional to the squared distance
        d2 = torch.cdist(x, centroids).pow(2).min(1).values
        pick = torch.multinomial((d2 / d2.sum()).cpu(), 1, generator=g) if d2.sum() > 0 else torch.tensor([0])
        centroids = torch.cat([centroids, x[pick.to(x.device)]])
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        if torch.equal(new, centroids):
            break
        centroids = new
    return centroids, torch.cdist(x, centroids).argmin(1)


def balanced_topk(scores: Tensor, k: int, iters: int = 20) -> Tensor:
    """Indices (b k) of a top-k choice balanced over experts: scores (b e) -> indices (b k), best first.

    Each expert gets about b*k/e of the batch's b*k slots, whatever the scores (the balanced assignment of
    BASE layers, Lewis et al. 2021, approximated). Sinkhorn iterations first rescale exp(scores) towards
    rows summing to k and columns to b*k/e, so that an input's preference is measured against what the
    others want. Then k rounds each give every input one more expert: slots are filled greedily in order
    of preference, at most ceil(b/e) per expert and round, never an expert the input already has. Only
    an input left with nothing but full experts goes over a capacity (its best free expert), which k = 1
    never needs. No gradient flows through the choice.
    """
    b, e = scores.shape
    log_p = scores.detach().double().cpu()
    log_row, log_col = math.log(k), math.log(b * k / e)
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, 0, keepdim=True) + log_col
        log_p = log_p - torch.logsumexp(log_p, 1, keepdim=True) + log_row
    order = log_p.flatten().argsort(descending=True).tolist()
    capacity = math.ceil(b / e)
    taken = torch.zeros(b, e, dtype=torch.bool)
    for _ in range(k):
        done, per_expert = [False] * b, [0] * e
        for flat in order:
            row, expert = divmod(flat, e)
            if not done[row] and not taken[row, expert] and per_expert[expert] < capacity:
                taken[row, expert], done[row] = True, True
                per_expert[expert] += 1
        for row in (r for r in range(b) if not done[r]):
            taken[row, log_p[row].masked_fill(taken[row], float("-inf")).argmax()] = True
    ranked = scores.detach().masked_fill(~taken.to(scores.device), float("-inf"))
    return ranked.topk(k, dim=-1).indices


class Router(nn.Module):
    """Maps per-input features (b m) to a RouterOutput."""

    def __init__(self, feature_dim: int, cfg: PrefixConfig, normalize: bool | None = None):
        super().__init__()
        self.cfg = cfg
        # Features are means of frozen embeddings whose scale varies by model; a parameter-free
        # LayerNorm makes the initial logit scale model-independent. One-hot group ids are read as they are
        # (normalize=None: all but router_input=group).
        if normalize is None:
            normalize = cfg.router_input != "group"
        self.norm = nn.LayerNorm(feature_dim, elementwise_affine=False) if normalize else nn.Identity()
        # A bias only for the k-means router: nearest-centroid logits need -|c_e|^2 / 2 per expert.
        self.proj = nn.Linear(feature_dim, cfg.num_experts, bias=cfg.router_init == "kmeans")
        nn.init.normal_(self.proj.weight, std=0.02)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)
        if cfg.router_init == "by_group":
            self._fix_group_map(feature_dim)

    @torch.no_grad()
    def _fix_group_map(self, num_groups: int) -> None:
        """Oracle routing: group g to expert g, frozen. The features are one-hot group ids, so column g of the
        weight is group g's logits: 0 for its expert, -BY_GROUP_GAP for the others (probability ~1e-13 there,
        no noise of std 1 flips it, and the z-loss stays ~0 rather than adding a constant to the training loss)."""
        if num_groups > self.cfg.num_experts:
            raise ValueError(
                f"prefix.router_init=by_group gives each of the {num_groups} groups its own expert; "
                f"set prefix.num_experts to at least {num_groups} (it is {self.cfg.num_experts})"
            )
        self.proj.weight.fill_(-BY_GROUP_GAP)
        self.proj.weight[torch.arange(num_groups), torch.arange(num_groups)] = 0.0
        self.proj.weight.requires_grad_(False)

    @torch.no_grad()
    def init_from_kmeans(self, features: Tensor, seed: int = 0, margin: float = KMEANS_MARGIN) -> Tensor:
        """Start as a nearest-centroid router over k-means clusters of features (n m); returns the clusters (n).

        logit_e = s (x . c_e - |c_e|^2 / 2) = -s |x - c_e|^2 / 2 + (a term equal for every expert), so the
        arg-max is the nearest centroid; s sets the mean gap between the best and the second-best logit on
        these features to `margin` (in nats), large enough to survive the training noise, small enough to
        let the task gradient move inputs between experts.
        """
        if self.proj.bias is None:
            raise ValueError("init_from_kmeans needs a router built with prefix.router_init=kmeans")
        x = self.norm(features.to(self.proj.weight.dtype)).double()
        centroids, assign = kmeans(x, self.cfg.num_experts, seed)
        raw = x @ centroids.T - centroids.pow(2).sum(1) / 2  # (n e)
        top2 = raw.topk(min(2, raw.shape[1]), dim=-1).values
        gap = (top2[:, 0] - top2[:, -1]).mean() if raw.shape[1] > 1 else raw.new_tensor(1.0)
        scale = margin / gap.clamp_min(1e-12)
        self.proj.weight.copy_((scale * centroids).to(self.proj.weight.dtype))
        self.proj.bias.copy_((-scale * centroids.pow(2).sum(1) / 2).to(self.proj.bias.dtype))
        return assign

    def forward(self, features: Tensor) -> RouterOutput:
        cfg = self.cfg
        logits = self.proj(self.norm(features.to(self.proj.weight.dtype))).float()
        probs = torch.softmax(logits / cfg.temperature, dim=-1)
        counted = None  # the choices the balance loss counts, where they are not the dispatched `indices`
        if cfg.k == cfg.num_experts:
            # Dense routing: every bank, in bank order, so concat places banks at fixed positions.
            indices = torch.arange(cfg.num_experts, device=logits.device).expand(logits.shape[0], -1)
            log_w = torch.log_softmax(logits / cfg.temperature, dim=-1)
            weights = probs
        else:
            noisy = logits
            if self.training and cfg.router_noise > 0:
                noisy = logits + torch.randn_like(logits) * cfg.router_noise
            if self.training and cfg.balanced_routing:
                indices = balanced_topk(noisy, cfg.k)
                top = noisy.gather(-1, indices)
                if cfg.balance_free_choices:
                    # The assignment gives every expert about b*k/E slots, so E * sum_e f_e * P_e counted on
                    # them is about sum_e P_e = 1 whatever the router does: the loss would not push the router's
                    # own choices, which evaluation uses, to spread. Count those (clean logits, as evaluation).
                    counted = logits.topk(cfg.k, dim=-1).indices
            else:
                top, indices = noisy.topk(cfg.k, dim=-1)
            log_w = torch.log_softmax(top / cfg.temperature, dim=-1)
            if cfg.k == 1:
                # A single renormalised weight is always 1 and passes no gradient to the router.
                # Straight-through: the value stays 1, the gradient is that of log p (as in Switch,
                # where the output is scaled by the chosen expert's probability).
                log_p = torch.log_softmax(noisy / cfg.temperature, dim=-1).gather(-1, indices)
                log_w = log_p - log_p.detach()
            weights = torch.zeros_like(probs).scatter(-1, indices, log_w.exp())
        if cfg.num_experts == 1:
            # One expert takes every input with weight 1 whatever its logit, so these losses can only move a router
            # that changes nothing; and they are not small: a one-centroid k-means init has no gap to scale by (the
            # fallback gap of 1 leaves s = margin), putting the logit near 500 and the z-loss near 3e5, whose
            # gradient then sets the norm that gradient clipping scales the prefix's gradient by (27 against 0.3
            # on Gemma 3 270M's first gem4 step).
            balance = z = logits.new_zeros(())
        else:
            balance = load_balance_loss(
                probs, indices if counted is None else counted, cfg.num_experts, sync=self.training
            )
            z = router_z_loss(logits)
        aux = cfg.balance_coef * balance + cfg.z_coef * z
        return RouterOutput(logits, weights, indices, log_w.exp(), log_w, balance, z, aux)
