"""Before training: which router input lets k-means find the data's groups (`moe-prefix router-features`)?

`prefix.router_init=kmeans` starts each expert on one k-means cluster of the router's features. Whether those
clusters follow the groups (sources, domains) depends on the features: the mean input embedding, or the
mean hidden state after some layers of the frozen backbone (`prefix.router_input=hidden`,
`prefix.router_layer`). This measures, for each choice, the NMI between the groups and the clusters that
the k-means start would use: the same sample of training inputs, normalisation, number of clusters
(`prefix.num_experts`) and k-means as `fit`, over several k-means seeds.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_prefix.analysis.routing_stats import normalized_mutual_info
from moe_prefix.router import kmeans
from moe_prefix.train.engine import KMEANS_SAMPLE, TASKS
from moe_prefix.train.run_config import ConfigError, RunConfig


def group_separation(cfg: RunConfig, seeds: int = 3, sample: int = KMEANS_SAMPLE) -> list[dict]:
    """One row per router input (embeddings, hidden1 .. hiddenL): its NMI with the groups, mean/min/max over
    `seeds` k-means seeds (cfg.seed, cfg.seed + 1, ...)."""
    if cfg.model.method != "prefix":
        raise ConfigError(f"router features need model.method=prefix, got {cfg.model.method!r}")
    if cfg.prefix.router_input == "group":
        raise ConfigError("prefix.router_input=group routes by the group itself: no input features to compare")
    if cfg.data.group_column is None:
        raise ConfigError("router features are compared with the groups: set data.group_column")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    built = TASKS[cfg.model.task].build(cfg)
    mixture = built.network.mixture
    batches = built.data.router_sample(sample, cfg.seed)
    groups = torch.cat([b["group_ids"] for b in batches]).numpy()
    parts = [mixture.candidate_router_features(b["input_ids"], b.get("attention_mask")) for b in batches]
    rows = []
    for name in parts[0]:
        features = mixture.router.norm(torch.cat([p[name] for p in parts]))  # what the router's k-means sees
        scores = [
            normalized_mutual_info(groups, kmeans(features, cfg.prefix.num_experts, seed=cfg.seed + s)[1].numpy())
            for s in range(seeds)
        ]
        rows.append(
            {"router_input": name, "nmi_mean": float(np.mean(scores)), "nmi_min": min(scores), "nmi_max": max(scores)}
        )
    return rows


def markdown_table(rows: list[dict], cfg: RunConfig, seeds: int) -> str:
    header = (
        f"NMI between the groups ({cfg.data.group_column}) and k-means clusters (k = {cfg.prefix.num_experts}) "
        f"of the router features of a training sample, over {seeds} k-means seeds.\n\n"
        "| router input | config | NMI mean | min | max |\n|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        name = r["router_input"]
        option = (
            "prefix.router_input=embeddings"
            if name == "embeddings"
            else f"prefix.router_input=hidden prefix.router_layer={name.removeprefix('hidden')}"
        )
        lines.append(f"| {name} | `{option}` | {r['nmi_mean']:.3f} | {r['nmi_min']:.3f} | {r['nmi_max']:.3f} |")
    return header + "\n".join(lines) + "\n"
