"""Probes: what the prefixes do inside attention, and where their keys sit relative to real tokens' keys.

- `prefix_attention_mass`: λ of He et al. (ICLR 2022, "Towards a unified view of parameter-efficient
  transfer learning"), the share of each query's attention that lands on the prefix. Prefix tuning is a
  gated adapter whose gate is λ; in `concat` mode the prefix is k banks side by side, so λ splits into one
  gate per routed expert. Measured inside our attention function during the ordinary forward
  (`PrefixState.probe_blocks`): no eager re-run, whatever kernel the model uses. On an encoder-decoder model
  each bank row is one site (encoder self-attention, decoder self-attention, cross-attention) of one layer;
  `mass_by_site` averages them per site.
- `prefix_key_geometry`: how many directions each bank uses (effective rank) and how alike the experts'
  keys are (linear CKA, principal angles), per layer.
- `key_distance`: how far prefix keys lie from the distribution of the keys the frozen model computes for
  real tokens (Mahalanobis with Ledoit-Wolf shrinkage, and mean cosine), with held-out real keys as scale.

Axes: n - examples, b - batch, t - tokens, e - experts, k - banks per input, l - layers, h - heads (query
heads for λ, key/value heads for keys), p - prefix positions, d - head dim, r - subspace dimension,
g - groups, m - held-out real keys.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

from moe_prefix.injection import PrefixState

from .geometry import effective_rank, linear_cka, mahalanobis_distance, mean_cosine_to_reference, principal_angles

__all__ = [
    "BankGeometry",
    "KeyDistance",
    "key_distance",
    "mass_by_site",
    "mean_by_group",
    "prefix_attention_mass",
    "prefix_key_geometry",
]


def _limited(batches: Iterable[Mapping[str, Tensor]], max_examples: int | None, progress: bool, desc: str):
    """Yield batches (truncated so that at most max_examples examples pass), under a tqdm bar."""
    total = len(batches) if hasattr(batches, "__len__") else None
    size = getattr(batches, "batch_size", None)
    if total is not None and size and max_examples is not None:
        total = min(total, -(-max_examples // size))
    seen = 0
    for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
        if max_examples is not None and seen >= max_examples:
            break
        n = batch["input_ids"].shape[0]
        if max_examples is not None and seen + n > max_examples:
            batch = {key: value[: max_examples - seen] for key, value in batch.items()}
            n = max_examples - seen
        seen += n
        yield batch


def _to(batch: Mapping[str, Tensor], device) -> dict[str, Tensor]:
    return {key: value.to(device) if isinstance(value, Tensor) else value for key, value in batch.items()}


def _decoder_mask(mixture, batch: Mapping[str, Tensor]) -> Tensor | None:
    """(b t') the real decoder tokens of a teacher-forced batch on an encoder-decoder model, else None.

    The backbone shifts the labels right into decoder inputs, so decoder input i is real where label i is.
    """
    if not mixture.rows:
        return None
    if "labels" not in batch:
        raise ValueError(
            "probes of an encoder-decoder model need `labels` in each batch (the decoder's teacher-forced target, "
            "-100 on padding), as the generation task's training batches carry"
        )
    return (batch["labels"] != -100).long()


def _run_backbone(mixture, batch: Mapping[str, Tensor], state: PrefixState) -> None:
    """The ordinary forward of a batch under `state`: teacher-forced on an encoder-decoder model."""
    decoder = {}
    if mixture.rows:
        decoder_mask = _decoder_mask(mixture, batch)
        decoder = {"labels": batch["labels"], "decoder_attention_mask": decoder_mask}
    # the queries are the whole input: a generation batch routes from its prompt alone (router_input_ids)
    state.query_mask = batch["attention_mask"]
    mixture.run_backbone(state, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **decoder)


def _row_map(mixture) -> dict[tuple[str, int], int] | None:
    """(site, layer) -> bank row on an encoder-decoder model, as `prepare` builds it; None otherwise."""
    return {where: row for row, where in enumerate(mixture.rows)} or None


@torch.no_grad()
def prefix_attention_mass(
    mixture, batches: Iterable[Mapping[str, Tensor]], max_examples: int | None = None, progress: bool = True
) -> dict[str, np.ndarray | None]:
    """λ per example, layer and query head, over a dataset; per routed expert in concat mode.

    ``batches``: dicts with input_ids, attention_mask (b t) and optionally group_ids, has_group, index (b),
    e.g. ``moe_prefix.tools.analyze.validation_batches(data)``. λ is averaged over each example's real query tokens.
    Generation batches route from ``router_input_ids`` / ``router_attention_mask`` (the prompt alone) where they
    carry them; an encoder-decoder model reads ``labels`` (b t') as the teacher-forced decoder input, and its
    decoder and cross-attention λ is averaged over the real decoder tokens.

    Returns numpy arrays:
    - ``total`` (n l h): attention mass on the whole prefix (shared and routed positions);
    - ``shared`` (n l h): the part of it on the shared positions (prefix.shared_len), None without them;
    - ``per_expert`` (n l h e): mass on each expert's bank, NaN for experts the example was not routed to
      (so ``np.nanmean`` over n is the mean over routed examples); None in blend mode, where the banks
      are mixed into one prefix and their mass cannot be told apart;
    - ``experts`` (n k) routed banks, ``weights`` (n e) routing weights, ``lengths`` (n) prefix lengths;
    - ``group_ids`` (n): group index, -1 where the example has none; ``index`` (n): position in its split;
    - ``sites``, ``site_layers`` (l): on an encoder-decoder model the site and the layer (within its stack) of each
      row l; None otherwise.
    """
    cfg = mixture.cfg
    if cfg.prefix_mode == "decoupled":
        raise ValueError("prefix_mode=decoupled adds the experts outside the softmax: there is no λ to measure")
    concat = cfg.combine == "concat"
    layers = mixture.dims.num_layers
    device = next(mixture.parameters()).device
    was_training = mixture.training
    mixture.eval()
    keys = ("total", "shared", "per_expert", "experts", "weights", "lengths")
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    out |= {"group_ids": [], "index": []}
    try:
        for batch in _limited(batches, max_examples, progress, "prefix attention"):
            batch = _to(batch, device)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            b = ids.shape[0]
            router = (batch.get("router_input_ids", ids), batch.get("router_attention_mask", mask))
            routing, state = mixture.prepare(*router, batch.get("group_ids"))
            k = routing.indices.shape[1]
            state.probe_blocks = k if concat else 1
            _run_backbone(mixture, batch, state)
            heads = next(iter(state.probes.values())).shape[1] if state.probes else mixture.dims.num_heads
            # A layer without a record saw an empty prefix (every bank cut to length 0): no mass.
            shared = 1 if cfg.shared_len else 0
            empty = torch.zeros(b, heads, shared + state.probe_blocks, device=device)
            blocks = torch.stack([state.probes.get(i, empty) for i in range(layers)], 1).float().cpu()  # (b l h s+k)
            out["total"].append(blocks.sum(-1).numpy())
            if shared:
                out["shared"].append(blocks[..., 0].numpy())
                blocks = blocks[..., 1:]
            if concat:
                per_expert = torch.full((b, layers, heads, cfg.num_experts), float("nan"))
                index = routing.indices.cpu()[:, None, None, :].expand(-1, layers, heads, -1)
                out["per_expert"].append(per_expert.scatter(-1, index, blocks).numpy())
            out["experts"].append(routing.indices.cpu().numpy())
            out["weights"].append(routing.weights.float().cpu().numpy())
            out["lengths"].append(routing.lengths.float().cpu().numpy())
            groups = batch.get("group_ids", torch.full((b,), -1, device=device))
            if "has_group" in batch:
                groups = torch.where(batch["has_group"].bool(), groups, -1)
            out["group_ids"].append(groups.cpu().numpy())
            seen = sum(map(len, out["index"]))
            out["index"].append(batch.get("index", torch.arange(seen, seen + b)).cpu().numpy())
    finally:
        mixture.train(was_training)
    if not out["total"]:
        raise ValueError("no examples to probe")
    result = {key: np.concatenate(v) if v else None for key, v in out.items()}
    rows = mixture.rows
    result["sites"] = np.array([site for site, _ in rows]) if rows else None
    result["site_layers"] = np.array([layer for _, layer in rows]) if rows else None
    return result


def mass_by_site(mass: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """λ of each site, (n h) the mean over the site's layers, from `prefix_attention_mass` of an encoder-decoder
    model; sites in bank-row order (encoder, decoder, cross), those without a prefix left out."""
    if mass.get("sites") is None:
        raise ValueError("mass_by_site needs the λ of an encoder-decoder model (its rows carry sites)")
    sites = mass["sites"]
    return {site: mass["total"][:, sites == site].mean(1) for site in dict.fromkeys(sites.tolist())}


def mean_by_group(values: Any, group_ids: Any, num_groups: int | None = None) -> np.ndarray:
    """Mean of ``values`` (n ...) over the examples of each group: (g ...), NaN for groups with none.

    Examples with group id -1 (no group) are left out; NaN entries (e.g. unrouted experts) are ignored.
    """
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(group_ids)
    num_groups = int(g.max()) + 1 if num_groups is None else num_groups
    means = np.full((max(num_groups, 0), *v.shape[1:]), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: NaN is the intended answer
        for i in range(num_groups):
            if (g == i).any():
                means[i] = np.nanmean(v[g == i], axis=0)
    return means


class BankGeometry(NamedTuple):
    """Geometry of the prefix banks (keys as they enter attention, per key/value head)."""

    key_rank: np.ndarray  # (e l h) effective rank of each bank's keys (p d) per head
    value_rank: np.ndarray  # (e l h) same for values
    key_cka: np.ndarray  # (l e e) linear CKA between two experts' keys over all heads; 1 on the diagonal
    key_angles: np.ndarray  # (l h e e r) principal angles (radians) between the experts' key subspaces


def _subspace(keys: np.ndarray, r: int) -> np.ndarray:
    """Orthonormal basis (d r) of the r leading directions of keys (p d) (right singular vectors)."""
    return np.linalg.svd(keys, full_matrices=False)[2][:r].T


@torch.no_grad()
def prefix_key_geometry(mixture, subspace_dim: int | None = None) -> BankGeometry:
    """Effective rank of each bank's keys and values; CKA and principal angles between experts' keys.

    CKA treats the h·d key coordinates as the examples and the p prefix positions as features, so it
    compares the second-moment matrices of two banks' key sets and does not depend on the order of
    positions (positions of different experts do not correspond to each other). Principal angles compare,
    per head, the spans of each bank's ``subspace_dim`` leading key directions; the default min(p, d // 2)
    keeps the comparison informative when p >= d, where every bank's keys span the whole head space.
    """
    kv = mixture.bank.tensor().detach().double().cpu().numpy()  # (e l c h p d)
    keys, values = kv[:, :, 0], kv[:, :, 1]  # (e l h p d)
    e, layers, heads, p, d = keys.shape
    r = subspace_dim or max(1, min(p, d // 2))
    if not 1 <= r <= min(p, d):
        raise ValueError(f"subspace_dim must lie in 1..min(p, d)={min(p, d)}, got {r}")
    cka = np.empty((layers, e, e))
    angles = np.zeros((layers, heads, e, e, r))
    for layer in range(layers):
        coords = rearrange(keys[:, layer], "e h p d -> e (h d) p")
        bases = [[_subspace(keys[i, layer, h], r) for h in range(heads)] for i in range(e)]
        for i in range(e):
            # Computed, not assumed: a constant bank has no geometry and its self-CKA is NaN, not 1.
            cka[layer, i, i] = linear_cka(coords[i], coords[i])
            for j in range(i + 1, e):
                cka[layer, i, j] = cka[layer, j, i] = linear_cka(coords[i], coords[j])
                for h in range(heads):
                    angles[layer, h, i, j] = angles[layer, h, j, i] = principal_angles(bases[i][h], bases[j][h])
    return BankGeometry(
        key_rank=np.asarray(effective_rank(keys)),
        value_rank=np.asarray(effective_rank(values)),
        key_cka=cka,
        key_angles=angles,
    )


class KeyDistance(NamedTuple):
    """Distances from the distribution of real tokens' keys (per layer and key/value head).

    ``real`` are held-out real keys measured against the same reference: the scale a prefix key is
    compared with (for d-dimensional keys from the reference distribution, squared distances average ~d).
    """

    prefix: np.ndarray  # (e l h p) Mahalanobis distance of each prefix key
    real: np.ndarray  # (l h m) Mahalanobis distance of held-out real keys
    prefix_cosine: np.ndarray  # (e l h p) mean cosine of each prefix key to the reference keys
    real_cosine: np.ndarray  # (l h m) same for the held-out real keys
    num_reference: int  # real keys the distribution was estimated from


@torch.no_grad()
def key_distance(
    mixture,
    batches: Iterable[Mapping[str, Tensor]],
    max_examples: int | None = None,
    max_tokens: int = 4096,
    seed: int = 0,
    progress: bool = True,
) -> KeyDistance:
    """How far each prefix key lies from the keys the frozen model computes for real input tokens.

    Real keys are captured in the attention path without any prefix (`PrefixState(kv=None, capture={})`; per
    bank row on an encoder-decoder model, from teacher-forced batches as in `prefix_attention_mass`),
    at most ``max_tokens`` of them at random (seeded; as many in every row as the row with the fewest has); half
    estimate each layer and head's key distribution
    (mean, Ledoit-Wolf shrunk covariance), the other half are measured against it as the reference scale.
    """
    device = next(mixture.parameters()).device
    was_training = mixture.training
    mixture.eval()
    captured: list[list[Tensor]] = [[] for _ in range(mixture.dims.num_layers)]
    try:
        for batch in _limited(batches, max_examples, progress, "real keys"):
            batch = _to(batch, device)
            state = PrefixState(kv=None, capture={}, rows=_row_map(mixture))
            _run_backbone(mixture, batch, state)
            encoder, decoder = batch["attention_mask"].bool().flatten(), _decoder_mask(mixture, batch)
            for layer, (k, _) in state.capture.items():
                # decoder self-attention's keys are the decoder's tokens; cross-attention's the encoder's
                real = decoder.bool().flatten() if mixture.rows and mixture.rows[layer][0] == "decoder" else encoder
                captured[layer].append(rearrange(k.float(), "b h t d -> h (b t) d")[:, real].cpu())
    finally:
        mixture.train(was_training)
    if not captured[0]:
        raise ValueError("no examples to capture keys from")
    rows = [torch.cat(c, 1) for c in captured]  # (h n d) each; n differs between an encoder's and a decoder's rows
    n = min(keys.shape[1] for keys in rows)
    if n < 4:
        raise ValueError(f"need at least 4 real tokens to estimate a key distribution, got {n}")
    # The same number of keys in every row (the fewest any row has, at most max_tokens), each row's drawn from
    # the same seed, so rows of equal length (every row of a single-stack model) draw the same tokens.
    keep = min(n, max_tokens)
    order = [torch.randperm(keys.shape[1], generator=torch.Generator().manual_seed(seed))[:keep] for keys in rows]
    real_keys = torch.stack([keys[:, i] for keys, i in zip(rows, order, strict=True)])  # (l h keep d)
    half = keep // 2
    reference = real_keys[:, :, :half].double().numpy()
    held_out = real_keys[:, :, half:].double().numpy()
    prefix = mixture.bank.tensor().detach()[:, :, 0].double().cpu().numpy()  # (e l h p d)
    return KeyDistance(
        prefix=mahalanobis_distance(prefix, reference[None]),
        real=mahalanobis_distance(held_out, reference),
        prefix_cosine=mean_cosine_to_reference(prefix, reference[None]),
        real_cosine=mean_cosine_to_reference(held_out, reference),
        num_reference=half,
    )
