"""Before training: which router input lets k-means find the data's groups (`moe-prefix router-features`)?

`prefix.router_init=kmeans` starts each expert on one k-means cluster of the router's features. Whether those
clusters follow the groups (sources, domains) depends on the features: the mean input embedding, or the
mean hidden state after some layers of the frozen backbone (`prefix.router_input=hidden`,
`prefix.router_layer`). This measures, for each choice, the NMI between the groups and the clusters that
the k-means start would use: the same sample of training inputs, normalisation, number of clusters
(`prefix.num_experts`) and k-means as `fit`, over several k-means seeds. Beside it, a supervised reference:
the held-out NMI and accuracy of a linear router fitted to the groups themselves on two thirds of the sample
(`analysis.routing_stats.linear_separability`), i.e. how well a router of the mixture's form could route by
group on these features if it were told the groups.

`transforms` asks whether another normalisation of the same features would let k-means find the groups:
"layernorm" is what the router (and so `fit`) uses; "spherical" centres the features over the sample and
scales each to unit length (k-means on cosine similarity); "whiten" keeps the top 2E principal directions
of the sample, each scaled to unit variance (PCA whitening). Both start from the router's LayerNorm output.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from moe_prefix.analysis.routing_stats import linear_separability, normalized_mutual_info
from moe_prefix.router import kmeans
from moe_prefix.train.engine import KMEANS_SAMPLE, TASKS
from moe_prefix.train.run_config import ConfigError, RunConfig


def spherical(x: torch.Tensor) -> torch.Tensor:
    """Features (n m) centred over the sample, each scaled to unit length."""
    centred = x.double() - x.double().mean(0)
    return centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)


def whiten(x: torch.Tensor, k: int) -> torch.Tensor:
    """Features (n m) -> coordinates (n k) on the sample's top-k principal directions, each of unit variance."""
    centred = x.double() - x.double().mean(0)
    _, singular, directions = torch.linalg.svd(centred, full_matrices=False)
    std = singular[:k] / math.sqrt(max(x.shape[0] - 1, 1))
    return centred @ directions[:k].T / std.clamp_min(1e-12)


# name -> (features (n m), number of experts) -> what k-means clusters; "layernorm": the router's own features
TRANSFORMS = {
    "layernorm": lambda x, num_experts: x,
    "spherical": lambda x, num_experts: spherical(x),
    "whiten": lambda x, num_experts: whiten(x, 2 * num_experts),
}


def group_separation(
    cfg: RunConfig, seeds: int = 3, sample: int = KMEANS_SAMPLE, transforms: tuple[str, ...] = ("layernorm",)
) -> list[dict]:
    """One row per router input (embeddings, hidden1 .. hiddenL) and transform: the NMI of its k-means
    clusters with the groups, mean/min/max over `seeds` k-means seeds (cfg.seed, cfg.seed + 1, ...), and the
    held-out NMI and accuracy of a linear classifier of the groups on the same features."""
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise ConfigError(f"unknown feature transform {unknown[0]!r}: choose from {', '.join(TRANSFORMS)}")
    if cfg.model.method != "prefix":
        raise ConfigError(f"router features need model.method=prefix, got {cfg.model.method!r}")
    if cfg.prefix.router_input == "group":
        raise ConfigError("prefix.router_input=group routes by the group itself: no input features to compare")
    no_groups = "router features are compared with the groups: set data.group_column"
    # Generation records may carry their group themselves (gem4's source) with data.group_column unset.
    if cfg.data.group_column is None and cfg.model.task != "generation":
        raise ConfigError(no_groups)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    built = TASKS[cfg.model.task].build(cfg)
    if len(built.data.group_names) < 2:
        raise ConfigError(f"{no_groups}, or use a source whose records carry one (gem4); this data has fewer than two")
    mixture = built.network.mixture
    batches = built.data.router_sample(sample, cfg.seed)
    groups = torch.cat([b["group_ids"] for b in batches]).numpy()
    parts = [mixture.candidate_router_features(b["input_ids"], b.get("attention_mask")) for b in batches]
    rows = []
    e = cfg.prefix.num_experts
    for name in parts[0]:
        normed = mixture.router.norm(torch.cat([p[name] for p in parts]))  # what the router's k-means sees
        for transform in transforms:
            features = TRANSFORMS[transform](normed, e)
            scores = [
                normalized_mutual_info(groups, kmeans(features, e, seed=cfg.seed + s)[1].numpy()) for s in range(seeds)
            ]
            supervised = linear_separability(features, groups, seed=cfg.seed)
            rows.append(
                {
                    "router_input": name,
                    "features": transform,
                    "nmi_mean": float(np.mean(scores)),
                    "nmi_min": min(scores),
                    "nmi_max": max(scores),
                    "linear_nmi": supervised.nmi,
                    "linear_accuracy": supervised.accuracy,
                }
            )
    return rows


def markdown_table(rows: list[dict], cfg: RunConfig, seeds: int) -> str:
    groups = cfg.data.group_column or "the source of each record"
    header = (
        f"NMI between the groups ({groups}) and k-means clusters (k = {cfg.prefix.num_experts}) "
        f"of the router features of a training sample, over {seeds} k-means seeds; beside it, the NMI and accuracy "
        "on the held-out third of the sample of a linear router fitted to the groups on the rest (supervised).\n\n"
        "| router input | config | features | k-means NMI mean | min | max | supervised linear NMI | accuracy |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        name = r["router_input"]
        option = (
            "prefix.router_input=embeddings"
            if name == "embeddings"
            else f"prefix.router_input=hidden prefix.router_layer={name.removeprefix('hidden')}"
        )
        lines.append(
            f"| {name} | `{option}` | {r['features']} | {r['nmi_mean']:.3f} | {r['nmi_min']:.3f} | {r['nmi_max']:.3f} "
            f"| {r['linear_nmi']:.3f} | {r['linear_accuracy']:.3f} |"
        )
    return header + "\n".join(lines) + "\n"
