"""The one place that touches transformers internals: prefix keys/values enter every attention call.

transformers (5.x) routes the attention of BERT, GPT-2, Llama, Qwen, T5 ... through
`ALL_ATTENTION_FUNCTIONS`. We register our own function under a new implementation name; it
prepends the layer's prefix keys/values, extends the mask, then calls the original kernel (sdpa or
eager). The per-forward prefix travels as a keyword argument (`moe_prefix_state`) that transformers
passes untouched from the model's forward to every attention call, so there is no global state to
clear, and gradient checkpointing, which replays a layer with the same keyword arguments, sees the
same prefix on recomputation.

Two ways to compute softmax attention over [prefix, tokens], equal up to rounding:

- split (`attention_path="auto"` picks it on CUDA where it applies): the two partial attentions, over the real
  keys on torch's fused kernel exactly as the frozen model would run them (flash with `is_causal` and no mask
  where the padding allows it) and over the P prefix keys beside it, merged by their log-sum-exp, forward and
  backward exact (`split_attention.py`). A prefix thus no longer moves attention to a slower masked kernel.
  T5's relative position bias joins the token part's mask (the memory-efficient kernel on CUDA, since flash
  takes none); the prefix part gets no position bias, as on the joint path.
- joint (the fallback): the prefix is prepended to the keys/values, the mask extended, and the model's own
  sdpa or eager function called. It runs when the model asked for eager attention, with attention
  dropout in training (the fused CPU kernel has none, and the split would not reproduce the joint
  path's dropout draws), when probes need the joint attention weights, for softcapping or attention sinks,
  for a position bias that needs a gradient (a relative-attention table in training; the fused kernels
  return none for their mask), on devices without a log-sum-exp kernel, or when `attention_path="joint"`; and
  under "auto" on the CPU, where sdpa's fused kernel takes the joint mask itself and the split only adds
  its prefix part (`attention_path="split"` forces it there, as the tests do).
  The decoupled prefix mode never prepends anything and calls the model's own function for the tokens.

Axes: b - batch, h - heads (key/value heads where g is present), g - query heads per key/value head,
q - query tokens, t - key tokens, p - prefix positions, d - head dim, l - layers, c - key/value.

Positions: real tokens keep positions 0..T-1 (PEFT's cache route shifts them to P..P+T-1); prefix
keys never receive rotary embeddings under either convention.

Encoder-decoder models (BART, mBART, T5, ...): `tag_sites` marks every attention module with its site
(encoder self-attention, decoder self-attention, cross-attention) and layer, since encoder and decoder
layers share `layer_idx` values and cross-attention modules carry one too. The prefix state maps
(site, layer) to its row (`PrefixState.rows`), so mixtures with different `prefix.sites` can share one
backbone; a module whose site the state has no row for runs untouched.

T5's relative position bias: the prefix positions get zero bias, i.e. a query attends to a prefix key by
content alone, at every site, and the real tokens keep exactly the bias the frozen model gives them. Prefix
keys thus carry no position, as under rotary embeddings above, and an example's attention does not depend
on its padding. (PEFT's cache route instead places the prefix at positions 0..P-1 before the decoder tokens
and gives it the bucketed bias of that distance; the two agree when the bias table is zero.)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import transformers
from packaging.version import Version
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .config import SITES  # encoder self-, decoder self-, cross-attention
from .split_attention import fused_kernel, split_attention

SDPA_NAME = "moe_prefix_sdpa"
EAGER_NAME = "moe_prefix_eager"
STATE_KWARG = "moe_prefix_state"
SITE_ATTR = "_moe_prefix_site"  # on attention modules of encoder-decoder models: (site, layer)


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
    decoder_query_mask: Tensor | None = None  # (b t) real decoder tokens (encoder-decoder models), likewise
    rows: dict[tuple[str, int], int] | None = None  # encoder-decoder models: (site, layer) -> row of kv
    decoupled: Tensor | None = None
    decoupled_kv: Tensor | None = None  # (e l c h p d) when prefix_mode="decoupled"
    decoupled_gate: Tensor | None = None  # (l h) per-layer, per-head gates of the decoupled term
    probe_blocks: int | None = None  # when set, record prefix attention mass split into this many blocks
    # (of the routed positions; with shared_len > 0 the shared positions' mass comes first, as one more block)
    shared_len: int = 0  # the first shared_len prefix positions are the shared part (PrefixConfig.shared_len)
    probes: dict[int, Tensor] = field(default_factory=dict)  # layer -> (b h blocks) mean mass over queries
    capture: dict[int, tuple[Tensor, Tensor]] | None = None  # layer -> input keys, values (b h t d)
    attention_path: str = "auto"  # auto: split where it applies, else joint; split: raise where it does not
    _layers: list[tuple[Tensor, Tensor]] | None = field(default=None, repr=False)
    # the token part's kernel mask, built once per forward from each mask object the model passes
    _token_masks: dict = field(default_factory=dict, repr=False)

    def reused(self) -> PrefixState:
        """The same prefix for another forward pass: a copy without what a pass caches or records (a pass under
        no_grad, such as generation, would leave its per-layer split without gradient)."""
        capture = None if self.capture is None else {}
        return replace(self, probes={}, capture=capture, _layers=None, _token_masks={})

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


def eager_attention(module, query, key, value, mask, scaling=None, dropout=0.0, position_bias=None, **kwargs):
    """Plain softmax attention with GQA, returning weights (used when the model asked for eager).

    position_bias: T5's additive relative position bias (b|1 h q t), added before the mask as T5 does.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if position_bias is not None:
        scores = scores + position_bias
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _record_probe(state: PrefixState, layer: int, module, query, key_all, mask, scaling, position_bias=None) -> None:
    """λ of He et al. (2022): the share of each query's attention that lands on the prefix."""
    p = state.kv.shape[-2] if state.kv is not None else 0
    groups = query.shape[1] // key_all.shape[1]
    keys = repeat_kv(key_all, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query.float(), keys.float().transpose(2, 3)) * scaling
    if position_bias is not None:
        scores = scores + position_bias.float()
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.float()
    weights = torch.softmax(scores, dim=-1)[..., :p]  # (b h q p)
    s, blocks = state.shared_len, state.probe_blocks
    mass = weights[..., s:].unflatten(-1, (blocks, (p - s) // blocks)).sum(-1)  # (b h q blocks)
    if s:
        mass = torch.cat([weights[..., :s].sum(-1, keepdim=True), mass], -1)  # (b h q 1+blocks)
    qmask = _query_mask(state, module)
    if qmask is None or qmask.shape[-1] != query.shape[2]:
        qmask = torch.ones(query.shape[0], query.shape[2], device=query.device)
    qmask = qmask.to(mass.dtype)[:, None, :, None]
    state.probes[layer] = (mass * qmask).sum(2) / qmask.sum(2).clamp_min(1)


def _query_mask(state: PrefixState, module) -> Tensor | None:
    """The real-token mask of this module's queries: the decoder's for decoder and cross-attention."""
    if getattr(module, SITE_ATTR, ("encoder", 0))[0] == "encoder":
        return state.query_mask
    return state.decoder_query_mask


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


def _token_mask(
    state: PrefixState, mask: Tensor, query: Tensor, causal_model: bool, module=None
) -> tuple[Tensor | None, bool]:
    """The token part's mask for the fused kernel, and whether `is_causal` without a mask replaces it.

    Built once per forward for each mask object the model passes (every layer passes the same one).
    `is_causal` replaces the mask when, on every real query row, the mask is the plain causal one: right
    padding, or none. Padding rows then see other keys than in the joint path, but no real row sees them,
    so outputs and gradients on real tokens are exact.
    """
    key = (id(mask), query.dtype)
    hit = state._token_masks.get(key)
    if hit is not None and hit[0] is mask:
        return hit[1], hit[2]
    b, q, t = query.shape[0], query.shape[2], mask.shape[-1]
    causal = False
    query_mask = _query_mask(state, module)  # the queries' own real tokens (the decoder's in a decoder)
    # (checked for causal models only: it reads the mask on the host, a GPU sync, once per forward)
    if causal_model and mask.dtype == torch.bool and q == t and query_mask is not None and query_mask.shape[-1] == q:
        real = _expand_batch(query_mask, b).bool()[:, None, :, None]  # (b 1 q 1)
        tril = torch.ones(q, t, dtype=torch.bool, device=mask.device).tril()
        causal = bool(((mask == tril) | ~real).all())
    additive = None
    if not causal:
        neg = torch.finfo(query.dtype).min
        # The fused kernels take an additive mask in the query's dtype; the dtype's min rather than -inf keeps
        # a row with no visible token finite (its log-sum-exp ~ min, so the merge gives it weight 0).
        if mask.dtype == torch.bool:
            additive = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(~mask, neg)
        else:
            additive = mask.to(query.dtype).clamp_min(neg)
        if query.device.type == "cuda" and t % 16:
            # on CUDA only the memory-efficient kernel takes a mask, and it reads bias rows 16-element aligned
            # (sdpa pads them the same way)
            additive = torch.nn.functional.pad(additive, (0, 16 - t % 16))[..., :t]
    if len(state._token_masks) >= 8:  # generate() passes a new mask every step: keep only recent ones
        state._token_masks.clear()
    state._token_masks[key] = (mask, additive, causal)
    return additive, causal


def _biased_token_mask(state: PrefixState, mask: Tensor | None, position_bias: Tensor, query: Tensor, module) -> Tensor:
    """The token part's additive mask with T5's relative position bias in it, (b|1 h q t) in the query's dtype.

    Visible keys get the bias the frozen model gives them, hidden ones the dtype's min (as in `_token_mask`: a
    row with no visible token stays finite). Built once per forward for each (mask, bias) pair the model passes:
    the layers of a stack share both.
    """
    key = ("position_bias", id(mask), id(position_bias), query.dtype)
    hit = state._token_masks.get(key)
    if hit is not None and hit[0] is mask and hit[1] is position_bias:
        return hit[2]
    b, q, t = query.shape[0], query.shape[2], position_bias.shape[-1]
    neg = torch.finfo(query.dtype).min
    # no gradient flows into the bias (a bias that needs one keeps the joint path): a leaf T5 makes under
    # activation checkpointing (zeros for cross-attention) leads nowhere
    bias = position_bias.detach().to(query.dtype)
    visible = _full_bool_mask(module, q, t, b, query.device) if mask is None else mask
    if visible is None:
        additive = bias
    elif visible.dtype == torch.bool:
        additive = torch.where(visible, bias, neg)
    else:
        additive = (bias + visible.to(query.dtype)).clamp_min(neg)
    if query.device.type == "cuda" and t % 16:  # the memory-efficient kernel reads bias rows 16-element aligned
        additive = torch.nn.functional.pad(additive, (0, 16 - t % 16))[..., :t]
    if len(state._token_masks) >= 8:
        state._token_masks.clear()
    state._token_masks[key] = (mask, position_bias, additive)
    return additive


def _split_blocker(module, state: PrefixState, kwargs, mask, q: int, t: int, fused: bool) -> str | None:
    """Why the split path cannot compute this call, or None when it can."""
    if not fused:
        return "the model asked for eager attention"
    if kwargs.get("dropout", 0.0):  # transformers passes the attention dropout only in training
        return "attention dropout in training"
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            return f"the model passes {name}"
    position_bias = kwargs.get("position_bias")
    if position_bias is not None and position_bias.grad_fn is not None:
        # the fused kernels return no gradient for their mask, where the bias would be
        return "the position bias needs a gradient (its relative-attention table trains)"
    if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 4 or mask.requires_grad):
        return "the attention mask is not a plain 4-d tensor"
    if mask is None and getattr(module, "is_causal", False) and 1 < q != t:
        return "a causal call with a key cache and no mask"
    return None


def _try_split(module, state, query, key, value, attention_mask, prefix, fused, kwargs):
    """The split path's output (b q h d), or None where the joint path must run (see the module docstring)."""
    prefix_key, prefix_value, bias = prefix
    device = query.device.type
    if state.probe_blocks:  # probes read the joint attention weights: they ask for the joint path themselves
        return None
    if state.attention_path == "auto" and device != "cuda":
        # On the CPU sdpa's fused kernel takes the joint mask itself: the split keeps the same kernel and only
        # adds its prefix part (measured slower, docs/benchmarks.md). On CUDA flash takes no mask: the split wins.
        return None
    if torch.is_autocast_enabled(device):
        # sdpa would run in the autocast dtype; rotary embeddings in fp32 leave q, k and v in mixed dtypes
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (x.to(dtype) for x in (query, key, value))
    q, t = query.shape[2], key.shape[2]
    blocker = _split_blocker(module, state, kwargs, attention_mask, q, t, fused)
    position_bias = kwargs.get("position_bias")
    if blocker is None:
        if position_bias is not None:
            mask, causal = _biased_token_mask(state, attention_mask, position_bias, query, module), False
        elif attention_mask is None:
            mask, causal = None, bool(getattr(module, "is_causal", False)) and q > 1
        else:
            causal_model = bool(getattr(module, "is_causal", False))
            mask, causal = _token_mask(state, attention_mask, query, causal_model, module)
        kernel = fused_kernel(query, mask is not None)
        if kernel is None:
            blocker = f"no fused kernel returns a log-sum-exp on {query.device.type} for head size {query.shape[-1]}"
    if blocker is not None:
        if state.attention_path == "split":
            raise ValueError(f"prefix.attention_path=split cannot run here: {blocker}; use auto or joint")
        return None
    scale = kwargs.get("scaling")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return split_attention(
        query, key, value, prefix_key.to(key.dtype), prefix_value.to(value.dtype), bias, mask, causal, scale, kernel
    )


def _make_attention(inner, fused: bool):
    """fused: inner is the model's sdpa, whose work the split path can take over."""

    def prefix_attention(module, query, key, value, attention_mask, **kwargs):
        state: PrefixState | None = kwargs.pop(STATE_KWARG, None)
        site = getattr(module, SITE_ATTR, None)
        if state is None:
            layer = None
        elif site is not None:  # encoder-decoder models: the module's row, None where its site has no prefix
            if state.rows is None:
                raise ValueError("this prefix state has no rows for an encoder-decoder model; build it with prepare()")
            layer = state.rows.get(site)
        else:  # single-stack models: one row per layer, cross-attention (BERT's) untouched
            layer = None if getattr(module, "is_cross_attention", False) else getattr(module, "layer_idx", None)
        if layer is None:
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
        if state.attention_path != "joint":
            prefix = (prefix_key, prefix_value, bias)
            out = _try_split(module, state, query, key, value, attention_mask, prefix, fused, kwargs)
            if out is not None:
                return (out if decoupled is None else out + decoupled.to(out.dtype)), None
        p = prefix_key.shape[-2]
        if attention_mask is None:
            attention_mask = _full_bool_mask(module, q, t, b, query.device)
            if attention_mask is None and bias is not None:
                attention_mask = torch.ones(b, 1, q, t, dtype=torch.bool, device=query.device)
        mask = _extended_mask(attention_mask, bias, b, q, p, query.dtype)
        key = torch.cat([prefix_key.to(key.dtype), key], dim=2)
        value = torch.cat([prefix_value.to(value.dtype), value], dim=2)
        position_bias = kwargs.get("position_bias")
        if position_bias is not None:
            # T5: zero bias on the prefix columns (content-only attention to the prefix, see the module docstring)
            zeros = position_bias.new_zeros(*position_bias.shape[:-1], p)
            kwargs["position_bias"] = position_bias = torch.cat([zeros, position_bias], -1)
        if state.probe_blocks:
            _record_probe(state, layer, module, query, key, mask, scaling, position_bias)
        # The causal structure now lives in the explicit mask: prefix columns are visible to every query.
        kwargs["is_causal"] = False
        out, weights = inner(module, query, key, value, mask, **kwargs)
        return (out if decoupled is None else out + decoupled.to(out.dtype)), weights

    return prefix_attention


AttentionInterface.register(SDPA_NAME, _make_attention(sdpa_attention_forward, fused=True))
AttentionInterface.register(EAGER_NAME, _make_attention(eager_attention, fused=False))
AttentionMaskInterface.register(SDPA_NAME, sdpa_mask)
AttentionMaskInterface.register(EAGER_NAME, sdpa_mask)  # our eager takes bool masks too


def _attention_modules(stack) -> list:
    """The modules of one stack that call the attention interface, in layer order."""
    return [m for m in stack.modules() if hasattr(m, "layer_idx") and hasattr(m, "is_causal") and hasattr(m, "config")]


# Encoder-decoder prefixes are tested from this transformers release on. At 5.6, the package's lowest supported
# release, T5's attention modules carry no layer index and the seq2seq tests fail; releases in between are
# untested, so they are refused rather than trusted.
SEQ2SEQ_MIN_TRANSFORMERS = "5.24"


def seq2seq_supported(version: str | None = None) -> bool:
    """Whether this transformers release (or `version`) is one encoder-decoder prefixes are tested on."""
    return Version(version or transformers.__version__) >= Version(SEQ2SEQ_MIN_TRANSFORMERS)


def tag_sites(model, sites: tuple[str, ...]) -> list[tuple[str, int]]:
    """Mark each attention module of an encoder-decoder model with its (site, layer).

    Returns the prefix rows as (site, layer), ordered encoder self-attention, decoder self-attention,
    cross-attention, layers ascending within a site, keeping only `sites`; [] for a single-stack model (rows
    are its layers).
    The decoder's self-attention is the causal one (BART's `self_attn`, T5's `SelfAttention`); its other
    attention is cross-attention (`encoder_attn`, `EncDecAttention`).
    """
    if not getattr(model.config, "is_encoder_decoder", False):
        return []
    if not seq2seq_supported():
        raise ValueError(
            f"encoder-decoder backbones need transformers >= {SEQ2SEQ_MIN_TRANSFORMERS} (the releases their prefixes "
            f"are tested on); this is {transformers.__version__}: "
            f"pip install -U 'transformers>={SEQ2SEQ_MIN_TRANSFORMERS}'"
        )
    found: dict[str, list] = {site: [] for site in SITES}
    found["encoder"] = _attention_modules(model.get_encoder())
    for module in _attention_modules(model.get_decoder()):
        found["decoder" if module.is_causal else "cross"].append(module)
    heads = {getattr(m, "num_heads", None) or getattr(m, "n_heads", None) for site in SITES for m in found[site]}
    if len(heads) != 1:
        raise ValueError(
            f"{type(model).__name__}: attention modules have different head counts {sorted(heads)}; "
            "one prefix bank needs one head count"
        )
    rows: list[tuple[str, int]] = []
    for site in SITES:
        modules = found[site]
        if not modules:
            raise ValueError(f"found no {site} attention modules in {type(model).__name__}")
        layers = [m.layer_idx for m in modules]
        if layers != list(range(len(modules))):
            raise ValueError(f"{type(model).__name__}: {site} attention layer indices {layers} are not 0..n-1")
        for module in modules:
            module.__dict__[SITE_ATTR] = (site, module.layer_idx)  # a plain attribute, in no state dict
        if site in sites:
            rows.extend((site, layer) for layer in layers)
    return rows


def encoder_layers(model):
    """The encoder of an encoder-decoder model and its list of layers (BART's `layers`, T5's `block`)."""
    encoder = model.get_encoder()
    for module in encoder.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module):
            return encoder, module
    raise ValueError(f"could not find the encoder layers of {type(model).__name__}")


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
    """Give the model back the attention implementation `install` returned."""
    model.set_attn_implementation(previous or "sdpa")


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer in the backward (the prefix state replays with the layer's kwargs).

    transformers 5.x renamed gradient checkpointing to activation checkpointing and deprecates the old name.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
