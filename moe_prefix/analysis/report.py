"""Analysis report of one run: `write_report` writes report.md + PNGs (`moe-prefix analyze RUN_DIR` calls it).

Sections: routing by group (NMI and its permutation test), expert load and router entropy over training,
routing collapse, the prefix attention mass λ (He et al. 2022) per layer × head, per expert and per group (and
per site: encoder self-, decoder self- and cross-attention, on encoder-decoder models),
prefix lengths (Spearman with bootstrap intervals), and the geometry of the banks. Every estimate comes
with a 95 % bootstrap interval or a p-value; a section that does not apply to the run (a baseline without a
router, a single expert, fixed lengths) says why in one sentence instead.

The plot functions are public so the notebooks in `analysis/` reuse them; the run directory's tables are
read by `moe_prefix.train.run_dir` (`read_routing_table`, `read_training_log`). Figures are
`matplotlib.figure.Figure` objects drawn with the Agg canvas: no pyplot state, no display needed.

Axes: n - examples, e - experts, k - banks per input, l - layers, h - heads, g - groups.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moe_prefix.router import detect_collapse

from . import probes
from .routing_stats import RoutingTable, expert_load, group_experts, nmi_permutation_test, routing_entropy
from .stats import bootstrap_ci, cohens_d, spearman_with_ci

__all__ = [
    "write_report",
    "plot_expert_similarity",
    "plot_key_distance",
    "plot_lambda_heatmap",
    "plot_lambda_per_expert",
    "plot_lambda_per_group",
    "plot_prefix_lengths",
    "plot_routing_heatmap",
    "plot_training_routing",
]

REPORT_FILE = "report.md"
N_PERMUTATIONS = 2000


# -- figures --------------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _heatmap(ax, matrix: np.ndarray, rows: list[str], cols: list[str], fmt: str = "{:.2f}", **kwargs):
    """An annotated heatmap (small matrices only) with a colour bar."""
    image = ax.imshow(matrix, aspect="auto", cmap=kwargs.pop("cmap", "viridis"), **kwargs)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(cols)), cols, rotation=45 if max(map(len, cols), default=0) > 3 else 0)
    if matrix.size <= 200:
        for (i, j), v in np.ndenumerate(matrix):
            if np.isfinite(v):
                light = image.norm(v) > 0.6  # viridis turns yellow: dark text there
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color="k" if light else "w")
    ax.figure.colorbar(image, ax=ax)
    return image


def plot_routing_heatmap(table: RoutingTable) -> Figure:
    """Share of each group's examples whose top-1 expert is e: (e g), each column sums to 1; counts shown."""
    groups = _group_labels(table.groups)
    names = sorted(set(groups))
    counts = np.array([[np.sum((table.top1 == e) & (groups == g)) for g in names] for e in range(table.num_experts)])
    share = counts / np.maximum(counts.sum(0, keepdims=True), 1)
    fig = _figure(1.6 + 1.1 * len(names), 1.2 + 0.45 * table.num_experts)
    ax = fig.add_subplot()
    _heatmap(ax, share, [f"e{e}" for e in range(table.num_experts)], names, vmin=0, vmax=1)
    for (i, j), c in np.ndenumerate(counts):
        ax.text(j, i + 0.3, f"n={c}", ha="center", va="center", fontsize=6, color="k" if share[i, j] > 0.6 else "w")
    ax.set_xlabel("group")
    ax.set_ylabel("top-1 expert")
    ax.set_title("routing: share of each group per expert")
    return fig


def plot_group_experts(table: RoutingTable) -> Figure:
    """Group × expert: the share of each group's examples whose top-1 expert is e, and the group's mean routing
    weight on e (`routing_stats.group_experts`); each row sums to 1 in both panels."""
    routing = group_experts(_group_labels(table.groups), table.weights)
    rows = [f"{name} (n={n})" for name, n in zip(routing.names, routing.counts, strict=True)]
    experts = [f"e{e}" for e in range(table.num_experts)]
    fig = _figure(3.0 + 1.4 * table.num_experts, 1.2 + 0.45 * len(rows))
    for i, (matrix, title) in enumerate(((routing.top1_share, "top-1 share"), (routing.mean_weight, "mean weight"))):
        ax = fig.add_subplot(1, 2, i + 1)
        _heatmap(ax, matrix, rows if i == 0 else [""] * len(rows), experts, vmin=0, vmax=1)
        ax.set_xlabel("expert")
        ax.set_title(title)
    return fig


def _load_keys(log: dict) -> list[str]:
    """train/load/e0, e1, ... in expert order (e10 after e9)."""
    return sorted((k for k in log if k.startswith("train/load/e")), key=lambda k: int(k.rsplit("/e", 1)[1]))


def plot_training_routing(log: dict[str, tuple[np.ndarray, np.ndarray]]) -> Figure | None:
    """Expert load (share of routing slots) and mean router entropy over training steps."""
    loads = _load_keys(log)
    if not loads and "train/router_entropy" not in log:
        return None
    fig = _figure(10, 3.2)
    left, right = fig.subplots(1, 2)
    for key in loads:
        left.plot(*log[key], label=key.rsplit("/", 1)[1], lw=1)
    left.set_xlabel("step")
    left.set_ylabel("load")
    left.set_title("expert load (training batches)")
    if loads:
        left.legend(fontsize=7, ncols=2)
    if "train/router_entropy" in log:
        right.plot(*log["train/router_entropy"], color="k", lw=1)
    right.set_xlabel("step")
    right.set_ylabel("nats")
    right.set_title("mean per-example router entropy")
    return fig


def plot_lambda_heatmap(total: np.ndarray, rows: list[str] | None = None) -> Figure:
    """Mean λ over examples, per layer × head: total (n l h); rows: a label per layer (default its index)."""
    mean = _nanmean(total, 0)
    layers, heads = mean.shape
    fig = _figure(1.5 + 0.45 * heads + 0.05 * max(map(len, rows or [""])), 1.2 + 0.4 * layers)
    ax = fig.add_subplot()
    _heatmap(ax, mean, rows or [str(i) for i in range(layers)], [str(i) for i in range(heads)], vmin=0)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("λ: attention mass on the prefix")
    return fig


def plot_lambda_per_expert(per_expert: np.ndarray, rows: list[str] | None = None) -> Figure:
    """λ on each expert's bank (mean over heads and over the examples routed to it): per_expert (n l h e)."""
    mean = _nanmean(per_expert.mean(2), 0).T  # (e l)
    experts, layers = mean.shape
    fig = _figure(1.8 + 0.5 * layers, 1.2 + 0.4 * experts)
    ax = fig.add_subplot()
    _heatmap(ax, mean, [f"e{e}" for e in range(experts)], rows or [str(i) for i in range(layers)], vmin=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("expert")
    ax.set_title("λ per expert (routed examples)")
    return fig


def plot_lambda_per_group(
    total: np.ndarray, group_ids: np.ndarray, group_names: list[str], rows: list[str] | None = None
) -> Figure:
    """λ per group × layer (mean over heads and over the group's examples): total (n l h), group_ids (n)."""
    mean = probes.mean_by_group(total.mean(2), group_ids, len(group_names))  # (g l)
    layers = mean.shape[1]
    fig = _figure(2.0 + 0.5 * layers, 1.2 + 0.4 * len(group_names))
    ax = fig.add_subplot()
    _heatmap(ax, mean, list(group_names), rows or [str(i) for i in range(layers)], vmin=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("group")
    ax.set_title("λ per group")
    return fig


def plot_prefix_lengths(table: RoutingTable) -> Figure:
    """Histogram of prefix lengths, and length against input length and against per-example loss."""
    fig = _figure(11, 3.2)
    hist, by_input, by_loss = fig.subplots(1, 3)
    hist.hist(table.prefix_len, bins=min(30, max(5, len(np.unique(table.prefix_len)))), color="C0")
    hist.set_xlabel("prefix length")
    hist.set_ylabel("examples")
    by_input.scatter(table.input_len, table.prefix_len, s=8, alpha=0.6)
    by_input.set_xlabel("input tokens")
    by_input.set_ylabel("prefix length")
    by_loss.scatter(table.loss, table.prefix_len, s=8, alpha=0.6, color="C1")
    by_loss.set_xlabel("per-example loss")
    by_loss.set_ylabel("prefix length")
    return fig


def plot_expert_similarity(geometry: probes.BankGeometry, names: list[str] | None = None) -> Figure:
    """Linear CKA between the experts' keys, one (e e) panel per layer: geometry.key_cka (l e e); names: a title
    per layer (default "layer i")."""
    cka = geometry.key_cka
    layers, e = cka.shape[:2]
    cols = min(layers, 6)
    rows = -(-layers // cols)
    fig = _figure(0.6 + (0.45 * e + 0.6) * cols, 0.5 + (0.45 * e + 0.5) * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    labels = [f"e{i}" for i in range(e)]
    for layer, ax in enumerate(axes):
        if layer >= layers:
            ax.set_axis_off()
            continue
        image = ax.imshow(cka[layer], vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(e), labels, fontsize=6)
        ax.set_yticks(range(e), labels, fontsize=6)
        ax.set_title(names[layer] if names else f"layer {layer}", fontsize=8)
    fig.colorbar(image, ax=axes.tolist(), shrink=0.8)
    fig.suptitle("linear CKA between experts' keys")
    return fig


def plot_key_distance(distance: probes.KeyDistance, rows: list[str] | None = None) -> Figure:
    """Mahalanobis distance of prefix keys vs held-out real keys, per layer (box plots)."""
    layers = distance.real.shape[0]
    prefix = [distance.prefix[:, i].ravel() for i in range(layers)]
    real = [distance.real[i].ravel() for i in range(layers)]
    fig = _figure(2.5 + 0.9 * layers, 3.2)
    ax = fig.add_subplot()
    at = np.arange(layers)
    for values, offset, colour in ((real, -0.18, "0.8"), (prefix, 0.18, "C1")):
        boxes = {"facecolor": colour}
        ax.boxplot(values, positions=at + offset, widths=0.3, showfliers=False, patch_artist=True, boxprops=boxes)
    ax.set_xticks(at, rows or [str(i) for i in range(layers)], rotation=45 if rows else 0)
    ax.set_xlabel("layer")
    ax.set_ylabel("Mahalanobis distance")
    ax.set_title("keys: real held-out (grey) vs prefix (orange)")
    return fig


# -- the report -----------------------------------------------------------------------------------------
def _nanmean(x: np.ndarray, axis) -> np.ndarray:
    """np.nanmean without the warning for all-NaN slices (an expert nobody was routed to: NaN is right)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis)


def _group_labels(groups: np.ndarray) -> np.ndarray:
    return np.where(groups == "", "(none)", groups)


def _ci(ci, digits: int = 3, label: str = "95 % CI ") -> str:
    """'estimate (95 % CI low to high)'; pass label="" in table cells whose header names the interval."""
    return f"{ci.estimate:.{digits}f} ({label}{ci.low:.{digits}f} to {ci.high:.{digits}f})"


def _p(p: float) -> str:
    return f"p = {p:.3g}" if p >= 1e-3 else "p < 0.001"


class _Report:
    """Markdown lines and the figures they link to."""

    def __init__(self, folder: Path):
        self.folder, self.lines = folder, []

    def add(self, *lines: str) -> None:
        self.lines += [*lines, ""]

    def section(self, title: str) -> None:
        self.add(f"## {title}")

    def figure(self, fig: Figure | None, name: str, caption: str) -> None:
        if fig is None:
            return
        fig.savefig(self.folder / f"{name}.png", dpi=110)
        self.add(f"![{caption}]({name}.png)")

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.add(
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows),
        )


def _routing_section(rep: _Report, table: RoutingTable) -> None:
    rep.section("Routing by group")
    if not table.routed:
        rep.add("Skipped: this run has no router (a baseline), so there is no routing to analyse.")
        return
    if table.num_experts == 1:
        rep.add("Skipped: the run has one expert, so every example is routed to it.")
        return
    rep.figure(plot_routing_heatmap(table), "routing_heatmap", "top-1 expert by group")
    groups = _group_labels(table.groups)
    if len(set(groups)) < 2:
        rep.add("No NMI test: the validation set has fewer than two groups.")
    else:
        nmi, p = nmi_permutation_test(table.top1, groups, n_permutations=N_PERMUTATIONS, seed=0)
        rep.add(
            f"Normalised mutual information between the top-1 expert and the group: NMI = {nmi:.3f}, "
            f"{_p(p)} (one-sided permutation test of independence, {N_PERMUTATIONS} permutations)."
        )
    w = table.weights / table.weights.sum(1, keepdims=True)
    entropy = -(w * np.log(np.where(w > 0, w, 1))).sum(1)
    summary = routing_entropy(table.weights)
    rep.add(
        f"Per-example routing entropy {_ci(bootstrap_ci(entropy))} nats; entropy of the mean load "
        f"{summary.load_entropy:.3f} nats (uniform: {math.log(table.num_experts):.3f}); mutual information "
        f"between example and expert {summary.mutual_information:.3f} nats."
    )
    load = bootstrap_ci(w)  # column-wise: the soft load of each expert
    hard = expert_load(table.experts, table.num_experts)
    rep.table(
        ["expert", "soft load (95 % CI)", "share of routing slots"],
        [[f"e{e}", _ci_cell(load, e), f"{hard[e]:.3f}"] for e in range(table.num_experts)],
    )


def _ci_cell(ci, i: int, digits: int = 3) -> str:
    return f"{ci.estimate[i]:.{digits}f} ({ci.low[i]:.{digits}f} to {ci.high[i]:.{digits}f})"


def _training_section(rep: _Report, table: RoutingTable, log: dict) -> None:
    rep.section("Expert load and router entropy over training")
    if not table.routed or table.num_experts == 1:
        rep.add("Skipped: " + ("no router in this run." if not table.routed else "one expert, nothing to balance."))
        return
    fig = plot_training_routing(log)
    if fig is None:
        rep.add(
            "Skipped: the training log has no routing rows (trainer.log_every_n_steps exceeds the number of "
            "steps, or the run logged nothing)."
        )
        return
    rep.figure(fig, "training_routing", "expert load and router entropy over training")
    rows = []
    for key in ["train/router_entropy", *_load_keys(log)]:
        if key not in log:
            continue
        values = log[key][1]
        tail = values[-max(2, len(values) // 4) :]
        rows.append([key, _ci(bootstrap_ci(tail), label="") if len(tail) >= 2 else f"{tail[-1]:.3f} (one step)"])
    rep.add(
        "Mean over the last quarter of logged steps, with a bootstrap interval over those steps (steps are "
        "autocorrelated, so the interval is optimistic):"
    )
    rep.table(["metric", "last quarter (95 % CI)"], rows)


def _collapse_section(rep: _Report, table: RoutingTable, log: dict) -> None:
    rep.section("Routing collapse")
    if not table.routed or table.num_experts == 1:
        rep.add("Skipped: " + ("no router in this run." if not table.routed else "one expert cannot collapse."))
        return
    w = table.weights / table.weights.sum(1, keepdims=True)
    collapse = detect_collapse(w.mean(0))
    top = bootstrap_ci(w[:, collapse.expert])
    verdict = "collapsed" if collapse else "not collapsed"
    rep.add(
        f"Validation: {verdict} (threshold 90 %). The most loaded expert, e{collapse.expert}, takes "
        f"{_ci(top)} of the soft load (uniform: {1 / table.num_experts:.3f})."
    )
    loads = _load_keys(log)
    if loads:
        last = np.array([log[k][1][-1] for k in loads])
        train = detect_collapse(last) if last.sum() > 0 else None
        if train is not None:
            rep.add(
                f"Last logged training batch: {'collapsed' if train else 'not collapsed'}; expert "
                f"e{train.expert} took {train.share:.0%} of the routing slots."
            )


def _bank_rows(mixture) -> list[str] | None:
    """A label per bank row of an encoder-decoder model ("encoder 0", "cross 1", ...); None for one stack."""
    rows = getattr(mixture, "rows", None)
    return [f"{site} {layer}" for site, layer in rows] if rows else None


SITE_NAMES = {"encoder": "encoder self-attention", "decoder": "decoder self-attention", "cross": "cross-attention"}


def _lambda_section(rep: _Report, cfg, mixture, mass: dict | None, group_names: list[str], skip: str | None) -> None:
    rep.section("Prefix attention mass λ")
    if skip:
        rep.add(f"Skipped: {skip}")
        return
    if mixture is None:
        rep.add("Skipped: a baseline without prefixes has no attention on a prefix.")
        return
    if mass is None:
        rep.add("Skipped: prefix_mode=decoupled adds the experts outside the softmax, so no λ exists.")
        return
    total = mass["total"]  # (n l h)
    n, layers, _ = total.shape
    rows = _bank_rows(mixture)
    what = f"of {n} validation examples"
    if cfg.model.task == "generation":
        what = f"of {n} validation pairs (prompt + reference, teacher-forced; routed from the prompt)"
        if rows:
            what += (
                ": encoder self-attention over the prompt's tokens, decoder self- and cross-attention over the "
                "reference's (decoder inputs)"
            )
    rep.add(
        f"λ (He et al. 2022) is each query's share of attention on the prefix, averaged over the real tokens "
        f"{what}, and measured inside the attention call of the ordinary forward."
    )
    rep.figure(plot_lambda_heatmap(total, rows), "lambda_layer_head", "λ per layer and head")
    if n < 2:
        rep.add("Too few examples for intervals.")
        return
    rep.add(f"Mean λ over layers and heads: {_ci(bootstrap_ci(total.mean((1, 2))))}.")
    if rows:
        sites = probes.mass_by_site(mass)
        rep.add("Per site (mean over the site's layers and heads):")
        rep.table(
            ["site", "layers", "λ (95 % CI)"],
            [
                [SITE_NAMES[site], int((mass["sites"] == site).sum()), _ci(bootstrap_ci(v.mean(1)), label="")]
                for site, v in sites.items()
            ],
        )
    per_layer = bootstrap_ci(total.mean(2))
    if rows:
        cells = [[site, int(layer)] for site, layer in zip(mass["sites"], mass["site_layers"], strict=True)]
        rep.table(["site", "layer", "λ (95 % CI)"], [[*cells[i], _ci_cell(per_layer, i)] for i in range(layers)])
    else:
        rep.table(["layer", "λ (95 % CI)"], [[i, _ci_cell(per_layer, i)] for i in range(layers)])
    if mass.get("shared") is not None:
        shared = mass["shared"].mean((1, 2))  # (n)
        rep.add(
            f"Of it, on the shared positions (prefix.shared_len, weight one for every input): "
            f"{_ci(bootstrap_ci(shared))}; on the routed positions: {_ci(bootstrap_ci(total.mean((1, 2)) - shared))}."
        )
    per_expert = mass["per_expert"]
    if per_expert is None:
        rep.add("No per-expert λ: blend mode mixes the banks into one prefix, so their mass cannot be separated.")
    elif per_expert.shape[-1] == 1:
        rep.add("No per-expert λ: one expert.")
    else:
        rep.figure(plot_lambda_per_expert(per_expert, rows), "lambda_expert", "λ per expert and layer")
        cells = []
        for e in range(per_expert.shape[-1]):
            values = per_expert[..., e].mean((1, 2))  # (n), NaN where not routed to e
            values = values[np.isfinite(values)]
            cell = _ci(bootstrap_ci(values), label="") if len(values) >= 2 else "too few routed examples"
            cells.append([f"e{e}", len(values), cell])
        rep.add("λ on each expert's bank (includes the log-weight gate), over the examples routed to it:")
        rep.table(["expert", "examples", "λ (95 % CI)"], cells)
    groups = mass["group_ids"]
    present = [g for g in range(len(group_names)) if (groups == g).sum() >= 2]
    if not present:
        rep.add("No per-group λ: the examples carry no group, or each group has fewer than two examples.")
        return
    rep.figure(plot_lambda_per_group(total, groups, group_names, rows), "lambda_group", "λ per group and layer")
    rep.table(
        ["group", "examples", "λ (95 % CI)"],
        [
            [group_names[g], int((groups == g).sum()), _ci(bootstrap_ci(total[groups == g].mean((1, 2))), label="")]
            for g in present
        ],
    )


def _length_section(rep: _Report, table: RoutingTable) -> None:
    rep.section("Prefix lengths")
    if not table.routed:
        rep.add("Skipped: no prefix in this run.")
        return
    lengths = table.prefix_len
    if np.ptp(lengths) == 0:
        rep.add(
            f"Skipped: every example got the same prefix length ({lengths[0]:g}), so there is nothing to correlate."
        )
        return
    rep.figure(plot_prefix_lengths(table), "prefix_length", "prefix lengths")
    rep.add(
        f"- mean prefix length {_ci(bootstrap_ci(lengths), 2)};",
        f"- Spearman ρ(prefix length, input tokens) = {_ci(spearman_with_ci(lengths, table.input_len))};",
        f"- Spearman ρ(prefix length, per-example loss) = {_ci(spearman_with_ci(lengths, table.loss))}.",
        "",
        "Intervals are percentile bootstraps over examples.",
    )


def _geometry_section(rep: _Report, mixture, distance: probes.KeyDistance | None, skip: str | None) -> None:
    rep.section("Bank geometry")
    if skip:
        rep.add(f"Skipped: {skip}")
        return
    if mixture is None:
        rep.add("Skipped: a baseline has no prefix banks.")
        return
    geo = probes.prefix_key_geometry(mixture)
    e = geo.key_rank.shape[0]
    rep.add(
        "The banks are fixed tensors, so effective ranks (Roy & Vetterli 2007), CKA and principal angles are "
        "exact values, not estimates. CKA compares the experts' key sets over the key coordinates "
        "(order of positions ignored); angles are between the spans of each bank's leading key directions."
    )
    off = ~np.eye(e, dtype=bool)
    labels = _bank_rows(mixture)
    rows = []
    for layer in range(geo.key_cka.shape[0]):
        name = labels[layer] if labels else layer
        row = [name, f"{geo.key_rank[:, layer].mean():.2f}", f"{geo.value_rank[:, layer].mean():.2f}"]
        if e > 1:
            angles = np.degrees(geo.key_angles[layer].mean(-1))[:, off]
            row += [f"{geo.key_cka[layer][off].mean():.3f}", f"{angles.mean():.1f}"]
        else:
            row += ["–", "–"]
        if distance is not None:
            row += [f"{np.median(distance.prefix[:, layer]):.2f}", f"{np.median(distance.real[layer]):.2f}"]
        rows.append(row)
    header = ["layer", "key eff. rank", "value eff. rank", "mean CKA between experts", "mean principal angle (°)"]
    if distance is not None:
        header += ["prefix key distance (median)", "real key distance (median)"]
    rep.table(header, rows)
    if e == 1:
        rep.add("CKA and angles between experts are skipped: the run has one expert.")
    else:
        rep.figure(plot_expert_similarity(geo, labels), "expert_similarity", "linear CKA between experts' keys")
    rep.table(
        ["expert", "key eff. rank", "value eff. rank"],
        [[f"e{i}", f"{geo.key_rank[i].mean():.2f}", f"{geo.value_rank[i].mean():.2f}"] for i in range(e)],
    )
    if distance is None:
        return
    rep.figure(plot_key_distance(distance, labels), "key_distance", "distance of keys from the real-key distribution")
    prefix, real = distance.prefix.ravel(), distance.real.ravel()
    rep.add(
        f"Mahalanobis distance from the distribution of {distance.num_reference} real tokens' keys per layer "
        f"and head (Ledoit-Wolf shrinkage): prefix keys {_ci(bootstrap_ci(prefix), 2)}, held-out real keys "
        f"{_ci(bootstrap_ci(real), 2)}; Cohen's d = {cohens_d(prefix, real):.2f}. Mean cosine to the real keys: "
        f"prefix {distance.prefix_cosine.mean():.3f}, real {distance.real_cosine.mean():.3f}."
    )


def _header(rep: _Report, run_name: str, cfg, metrics: dict | None) -> None:
    rep.add(f"# Analysis of run `{run_name}`")
    p = cfg.prefix
    desc = f"method `{cfg.model.method}`, backbone `{cfg.model.backbone}`"
    if cfg.model.method == "prefix":
        desc += (
            f"; {p.num_experts} expert{'s' * (p.num_experts != 1)} × {p.prefix_len} positions, "
            f"routing `{p.routing}` (k = {p.k}), "
            f"combine `{p.combine}`, length `{p.length}`, router input `{p.router_input}`, mode `{p.prefix_mode}`"
        )
    rep.add(desc + ".")
    if metrics is not None:
        shown = {k: v for k, v in metrics.items() if k.startswith("val/acc") or k in ("val/loss", "val/f1")}
        rep.table(["metric", "value"], [[k, f"{v:.4f}"] for k, v in sorted(shown.items())])


def write_report(
    folder: Path,
    run_name: str,
    cfg,
    metrics: dict | None,
    table: RoutingTable,
    training_log: dict,
    mixture=None,
    mass: dict | None = None,
    distance: probes.KeyDistance | None = None,
    group_names: list[str] | None = None,
    skip: str | None = None,
) -> Path:
    """Write folder/report.md and its PNG figures from what a run left and what the probes measured.

    ``mixture``, ``mass`` and ``distance`` are None where the model was not probed; ``skip`` then says why
    in one sentence. Returns the report's path.
    """
    if len(table.ids) < 2:
        raise ValueError(f"{len(table.ids)} validation example(s): the statistics need at least 2")
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()  # figures of a section that is skipped this time must not linger
    rep = _Report(folder)
    _header(rep, run_name, cfg, metrics)
    _routing_section(rep, table)
    _training_section(rep, table, training_log)
    _collapse_section(rep, table, training_log)
    _lambda_section(rep, cfg, mixture, mass, group_names or [], skip)
    _length_section(rep, table)
    _geometry_section(rep, mixture, distance, skip)
    path = folder / REPORT_FILE
    path.write_text("\n".join(rep.lines).rstrip() + "\n")
    return path
