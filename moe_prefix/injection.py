"""The one place that touches transformers internals: prefix keys/values enter every attention call.

transformers (5.x) routes the attention of BERT, GPT-2, Llama, Qwen, T5 ... through
`ALL_ATTENTION_FUNCTIONS`. We register our own function under a new implementation name; it
prepends the layer's prefix keys/values, extends the mask, then calls the original kernel (sdpa or
eager). The per-forward prefix travels as a keyword argument (`moe_prefix_state`) that transformers
passes untouched from the model's forward to every attention call, so there is no global state to
clear, and gradient checkpointing, which replays a layer with the same keyword arguments, sees the
same prefix on recomputation.

Axes: b - batch, h - heads, q - query tokens, t - key tokens, p - prefix positions, d - head dim,
l - layers, c - key/value.

Positions: real tokens keep positions 0..T-1 (PEFT's cache route shifts them to P..P+T-1); prefix
keys never receive rotary embeddings under either convention.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SDPA_NAME = "moe_prefix_sdpa"
EAGER_NAME = "moe_prefix_eager"
STATE_KWARG = "moe_prefix_state"


@dataclass
class PrefixState:
    """Everything attention needs for one forward pass.

    kv: (b l c h p d) prefix keys (c=0) and values (c=1) for every layer.
    bias: (b p) additive attention bias on prefix positions (log-mask, log routing weight), or None.
    decoupled: (b e) weights of experts whose contribution is added outside the softmax, or None.
    """

    kv: Tensor | None
    bias: Tensor | None = None
    query_mask: Tensor | None = None  # (b t) real tokens, for probes that average over queries
    decoupled: Tensor | None = None
    decoupled_kv: Tensor | None = None  # (e l c h p d) when prefix_mode="decoupled"
    decoupled_gate: Tensor | None = None  # (l h) per-layer, per-head gates of the decoupled term
    probe_blocks: int | None = None  # when set, record prefix attention mass split into this many blocks
    probes: dict[int, Tensor] = field(default_factory=dict)  # layer -> (b h blocks) mean mass over queries
    capture: dict[int, tuple[Tensor, Tensor]] | None = None  # layer -> input keys, values (b h t d)
    _layers: list[tuple[Tensor, Tensor]] | None = field(default=None, repr=False)

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Prefix keys and values of layer i, (b h p d) each.

        Split once with unbind: its backward stacks every layer's gradient into one buffer, where
        indexing kv[:, i] in each layer zero-fills a full (b l c h p d) gradient per layer (L^2 traffic).
        """
        if self._layers is None:
            self._layers = [tuple(kv.unbind(1)) for kv in self.kv.unbind(1)]
        return self._layers[i]


def _expand_batch(x: Tensor | None, b: int) -> Tensor | None:
    """Beam search and num_return_sequences repeat each example; repeat its prefix the same way."""
    if x is None or x.shape[0] == b:
        return x
    return x.repeat_interleave(b // x.shape[0], dim=0)


def _full_bool_mask(module, q: int, t: int, b: int, device) -> Tensor | None:
    """The mask transformers skipped (causal models with no padding rely on is_causal)."""
    if not getattr(module, "is_causal", False) or q == 1:
        return None
    # A query at position i (of the last q of t keys) sees keys 0..i: bottom-right-aligned causal mask.
    rows = torch.arange(t - q, t, device=device)[:, None]
    return (rows >= torch.arange(t, device=device)[None, :]).expand(b, 1, q, t)


def _extended_mask(mask: Tensor | None, bias: Tensor | None, b: int, q: int, p: int, dtype) -> Tensor | None:
    """Mask over [prefix, keys] (b 1 q p+t): bool when no bias is needed, additive float otherwise."""
    if mask is None:
        return None  # no padding, not causal, no bias: every query sees every prefix position
    if bias is None and mask.dtype == torch.bool:
        return torch.cat([mask.new_ones(mask.shape[0], 1, mask.shape[2], p), mask], -1)
    neg = torch.finfo(dtype).min
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, neg)
    mask = mask.to(dtype).expand(b, 1, q, mask.shape[-1])
    prefix = mask.new_zeros(b, 1, q, p)
    if bias is not None:
        # -inf (a hard-masked position) becomes the dtype's min so fully masked rows stay finite.
        prefix = prefix + bias.to(dtype).clamp_min(neg)[:, None, None, :]
    return torch.cat([prefix, mask], -1)


def eager_attention(module, query, key, value, mask, scaling=None, dropout=0.0, **kwargs):
    """Plain softmax attention with GQA, returning weights (used when the model asked for eager)."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _record_probe(state: PrefixState, layer: int, module, query, key_all, mask, scaling) -> None:
    """λ of He et al. (2022): the share of each query's attention that lands on the prefix."""
    p = state.kv.shape[-2] if state.kv is not None else 0
    groups = query.shape[1] // key_all.shape[1]
    keys = repeat_kv(key_all, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query.float(), keys.float().transpose(2, 3)) * scaling
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.float()
    weights = torch.softmax(scores, dim=-1)[..., :p]  # (b h q p)
    blocks = state.probe_blocks
    mass = weights.unflatten(-1, (blocks, p // blocks)).sum(-1)  # (b h q blocks)
    qmask = state.query_mask
    if qmask is None or qmask.shape[-1] != query.shape[2]:
        qmask = torch.ones(query.shape[0], query.shape[2], device=query.device)
    qmask = qmask.to(mass.dtype)[:, None, :, None]
    state.probes[layer] = (mass * qmask).sum(2) / qmask.sum(2).clamp_min(1)


def _decoupled_term(state: PrefixState, layer: int, query: Tensor, scaling) -> Tensor:
    """Prefix-Tuning+ style: experts add sum_e w_e gate softmax(q K_e^T) V_e outside the input softmax.

    The input tokens keep their whole attention budget; the experts' contribution no longer competes
    with them for softmax mass (He et al. 2025). Returns (b q h d).
    """
    kv = state.decoupled_kv[:, layer]  # (e c h p d)
    groups = query.shape[1] // kv.shape[2]
    keys = repeat_kv(kv[:, 0], groups)  # (e h p d)
    values = repeat_kv(kv[:, 1], groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.einsum("bhqd,ehpd->behqp", query, keys.to(query.dtype)) * scaling
    out = torch.einsum("behqp,ehpd->behqd", scores.softmax(-1), values.to(query.dtype))
    weights = _expand_batch(state.decoupled, query.shape[0]).to(query.dtype)
    gate = state.decoupled_gate[layer].to(query.dtype)  # (h)
    mixed = torch.einsum("be,behqd->bhqd", weights, out) * gate[None, :, None, None]
    return mixed.transpose(1, 2)


def _make_attention(inner):
    def prefix_attention(module, query, key, value, attention_mask, **kwargs):
        state: PrefixState | None = kwargs.pop(STATE_KWARG, None)
        layer = getattr(module, "layer_idx", None)
        if state is None or layer is None or getattr(module, "is_cross_attention", False):
            return inner(module, query, key, value, attention_mask, **kwargs)
        if state.capture is not None:
            state.capture[layer] = (key.detach(), value.detach())
        scaling = kwargs.get("scaling")
        b, q, t = query.shape[0], query.shape[2], key.shape[2]
        decoupled = None
        if state.decoupled_kv is not None:
            decoupled = _decoupled_term(state, layer, query, scaling)
        if state.kv is None or state.kv.shape[-2] == 0:
            out, weights = inner(module, query, key, value, attention_mask, **kwargs)
            return (out if decoupled is None else out + decoupled.to(out.dtype)), weights
        prefix_key, prefix_value = (_expand_batch(x, b) for x in state.layer(layer))  # (b h p d)
        bias = _expand_batch(state.bias, b)
        p = prefix_key.shape[-2]
        if attention_mask is None:
            attention_mask = _full_bool_mask(module, q, t, b, query.device)
            if attention_mask is None and bias is not None:
                attention_mask = torch.ones(b, 1, q, t, dtype=torch.bool, device=query.device)
        mask = _extended_mask(attention_mask, bias, b, q, p, query.dtype)
        key = torch.cat([prefix_key.to(key.dtype), key], dim=2)
        value = torch.cat([prefix_value.to(value.dtype), value], dim=2)
        if state.probe_blocks:
            _record_probe(state, layer, module, query, key, mask, scaling)
        # The causal structure now lives in the explicit mask: prefix columns are visible to every query.
        kwargs["is_causal"] = False
        out, weights = inner(module, query, key, value, mask, **kwargs)
        return (out if decoupled is None else out + decoupled.to(out.dtype)), weights

    return prefix_attention


AttentionInterface.register(SDPA_NAME, _make_attention(sdpa_attention_forward))
AttentionInterface.register(EAGER_NAME, _make_attention(eager_attention))
AttentionMaskInterface.register(SDPA_NAME, sdpa_mask)
AttentionMaskInterface.register(EAGER_NAME, sdpa_mask)  # our eager takes bool masks too


@contextmanager
def state_kwarg_allowed(model):
    """Let generate() pass the prefix state to forward: its kwarg check knows only model arguments."""
    original = model._validate_model_kwargs

    def validate(model_kwargs):
        return original({k: v for k, v in model_kwargs.items() if k != STATE_KWARG})

    model._validate_model_kwargs = validate
    try:
        yield
    finally:
        del model._validate_model_kwargs


def install(model) -> str:
    """Route the model's attention through the prefix function; returns the implementation it had."""
    previous = model.config._attn_implementation
    if previous in (SDPA_NAME, EAGER_NAME):
        return previous
    model.set_attn_implementation(EAGER_NAME if previous == "eager" else SDPA_NAME)
    return previous


def uninstall(model, previous: str) -> None:
    model.set_attn_implementation(previous or "sdpa")
