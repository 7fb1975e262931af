"""The mixture of prefix experts: where banks, router and lengths meet, wrapped around a frozen model.

Axes: b - batch, t - tokens, e - experts, k - banks per input, l - layers, c - key/value,
h - key/value heads, p - prefix positions, d - head dim, m - feature width.

    model = AutoModelForSequenceClassification.from_pretrained(...)
    mixture = moe_prefix.attach(model, moe_prefix.PrefixConfig(num_experts=4, prefix_len=16, top_k=2))
    out = mixture(input_ids=ids, attention_mask=mask, labels=y)
    loss = out.loss + out.routing.aux_loss
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from . import injection
from .bank import PrefixBank
from .config import BackboneDims, PrefixConfig
from .injection import STATE_KWARG, PrefixState
from .length import LengthController
from .router import Router


class MixtureRouting(NamedTuple):
    """Routing result of one forward pass (also on `output.routing` and `mixture.last_routing`)."""

    weights: Tensor  # (b e) routing weights, zero off the chosen banks
    indices: Tensor  # (b k) chosen banks
    lengths: Tensor  # (b) prefix length per input (per bank: mean over the chosen banks)
    logits: Tensor  # (b e) router logits
    aux_loss: Tensor  # scalar: balance + z-loss (weighted) + length cost; add it to the task loss
    balance_loss: Tensor
    z_loss: Tensor
    length_cost: Tensor


class _PrePassDone(Exception):
    def __init__(self, hidden: Tensor):
        self.hidden = hidden


def positions_from_mask(mask: Tensor) -> Tensor:
    """Position ids counting real tokens only, (b t) -> (b t): padding does not shift positions."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """(b t m), (b t) -> (b m)."""
    if mask is None:
        return x.mean(1)
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp_min(1)


def _decoder_layers(model, num_layers: int) -> nn.ModuleList:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"could not find the list of {num_layers} transformer layers in {type(model).__name__}")


class PrefixMixture(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: PrefixConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.dims = BackboneDims.from_config(backbone.config)
        # Encoder-decoder backbones: one bank row per prefixed attention module, (site, layer) each, in
        # prefix.sites; a single-stack backbone has one row per layer and rows == [].
        self.rows = injection.tag_sites(backbone, cfg.sites)
        if self.rows:
            self.dims = replace(self.dims, num_layers=len(self.rows))
            if cfg.init == "tokens":
                raise ValueError("prefix.init=tokens is not supported on encoder-decoder backbones; use init=random")
        for name, param in backbone.named_parameters():
            param.requires_grad_(any(name.startswith(prefix) for prefix in cfg.train_modules))
        if cfg.router_input == "group":
            if not cfg.num_groups:
                raise ValueError("prefix.router_input=group needs prefix.num_groups (the number of distinct groups)")
            feature_dim = cfg.num_groups
        else:
            feature_dim = backbone.get_input_embeddings().weight.shape[1]
        self.bank = PrefixBank(cfg, self.dims)
        self.router = Router(feature_dim, cfg)
        self.length = LengthController(feature_dim, cfg)
        # The shared part is a one-expert bank of its own (same init, reparameterisation and fold), built last so
        # that shared_len=0 draws exactly the random numbers it always did.
        self.shared = PrefixBank(cfg, self.dims, shared=True) if cfg.shared_len else None
        if cfg.prefix_mode == "decoupled":
            # Zero-initialised gates: the adapted model starts out exactly as the frozen one.
            self.gate = nn.Parameter(torch.zeros(self.dims.num_layers, self.dims.num_heads))
        self._previous_attn = injection.install(backbone)
        self._takes_position_ids = "position_ids" in inspect.signature(backbone.forward).parameters
        self.last_routing: MixtureRouting | None = None

    # -- routing -------------------------------------------------------------------------------
    def router_features(self, input_ids, attention_mask=None, group_ids=None) -> Tensor:
        """Per-input router features (b m); never carries gradient into the backbone."""
        cfg = self.cfg
        if cfg.router_input == "group":
            if group_ids is None:
                raise ValueError("prefix.router_input=group needs group_ids in the batch")
            return F.one_hot(group_ids.long(), cfg.num_groups).float()
        with torch.no_grad():
            if cfg.router_input == "embeddings":
                hidden = self.backbone.get_input_embeddings()(input_ids)
            else:
                hidden = self._pre_pass(input_ids, attention_mask)
        return _masked_mean(hidden.float(), attention_mask)

    @torch.no_grad()
    def candidate_router_features(self, input_ids, attention_mask=None) -> dict[str, Tensor]:
        """What each router input would give these inputs (b m each), from one frozen pass without prefix:
        "embeddings", then "hidden1" ... "hiddenL" (router_input=hidden with router_layer=1..L).

        For choosing prefix.router_input / router_layer before training (`moe-prefix router-features`).
        """
        stack, layers = self._router_stack()
        outputs: list[Tensor] = []

        def keep(_module, _args, output):
            outputs.append(output[0] if isinstance(output, tuple) else output)

        handles = [layer.register_forward_hook(keep) for layer in layers]
        try:
            stack(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            for handle in handles:
                handle.remove()
        embeddings = self.backbone.get_input_embeddings()(input_ids)
        features = {"embeddings": _masked_mean(embeddings.float(), attention_mask)}
        for depth, hidden in enumerate(outputs, start=1):
            features[f"hidden{depth}"] = _masked_mean(hidden.float(), attention_mask)
        return features

    def _router_stack(self) -> tuple[nn.Module, nn.ModuleList]:
        """What the router's pre-pass runs and its layers: the encoder of an encoder-decoder backbone."""
        if self.rows:
            return injection.encoder_layers(self.backbone)
        return self.backbone, _decoder_layers(self.backbone, self.dims.num_layers)

    def _pre_pass(self, input_ids, attention_mask) -> Tensor:
        """Hidden states after the first router_layer layers of the frozen model, without any prefix."""
        stack, layers = self._router_stack()
        if self.cfg.router_layer > len(layers):
            raise ValueError(f"prefix.router_layer={self.cfg.router_layer} exceeds the {len(layers)} layers")

        def stop(_module, _args, output):
            raise _PrePassDone(output[0] if isinstance(output, tuple) else output)

        handle = layers[self.cfg.router_layer - 1].register_forward_hook(stop)
        try:
            stack(input_ids=input_ids, attention_mask=attention_mask)
        except _PrePassDone as done:
            return done.hidden
        finally:
            handle.remove()
        raise RuntimeError("the pre-pass never reached the router layer")

    def prepare(self, input_ids, attention_mask=None, group_ids=None) -> tuple[MixtureRouting, PrefixState]:
        """Route a batch and build the prefix state that attention reads during the forward."""
        cfg = self.cfg
        features = self.router_features(input_ids, attention_mask, group_ids)
        route = self.router(features)
        length = self.length(features, route, cfg.combine)
        if cfg.prefix_mode == "decoupled":
            state = PrefixState(
                kv=None, decoupled=route.weights, decoupled_kv=self.bank.tensor(), decoupled_gate=self.gate
            )
        elif cfg.combine == "blend":
            kv = self.bank.blend(route.topk_weights, route.indices, keep=length.keep)
            bias = None if length.log_mask is None else length.log_mask[:, 0]  # one blended prefix per input
            state = PrefixState(kv=kv, bias=bias)
        else:
            kv = self.bank.gather(route.indices, keep=length.keep)
            kv = rearrange(kv, "b k l c h p d -> b l c h (k p) d")
            # log w_j on bank j's positions: exp(score + log w_j) = w_j exp(score), a gate inside attention.
            bias = route.topk_log_weights[:, :, None].expand(-1, -1, length.keep)
            if length.log_mask is not None:
                bias = bias + length.log_mask
            state = PrefixState(kv=kv, bias=rearrange(bias, "b k p -> b (k p)"))
        if self.shared is not None:
            state.kv, state.bias = self._with_shared(state.kv, state.bias)
            state.shared_len = cfg.shared_len
        state.query_mask = attention_mask
        state.attention_path = cfg.attention_path
        if self.rows:
            state.rows = {where: row for row, where in enumerate(self.rows)}
        routing = MixtureRouting(
            weights=route.weights,
            indices=route.indices,
            lengths=length.lengths.mean(-1),
            logits=route.logits,
            aux_loss=route.aux_loss + length.cost,
            balance_loss=route.balance_loss,
            z_loss=route.z_loss,
            length_cost=length.cost,
        )
        return routing, state

    def _with_shared(self, kv: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """[shared, routed] along p: kv (b l c h p d) -> (b l c h (s + p) d); bias (b p) -> (b (s + p)).

        The shared positions get bias 0, i.e. weight one inside the softmax, whatever the routing chose.
        """
        shared = self.shared.tensor()[0].to(kv.dtype)  # (l c h s d)
        shared = shared.expand(kv.shape[0], *shared.shape)
        if bias is not None:
            bias = torch.cat([bias.new_zeros(bias.shape[0], shared.shape[-2]), bias], -1)
        return torch.cat([shared, kv], -2), bias

    # -- forward / generate -----------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, group_ids=None, **kwargs):
        """The backbone's usual forward with the routed prefix; the output gains `.routing`."""
        routing, state = self.prepare(input_ids, attention_mask, group_ids)
        out = self.run_backbone(state, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        self.last_routing = routing
        out.routing = routing
        return out

    def run_backbone(self, state: PrefixState, input_ids=None, attention_mask=None, **kwargs):
        """The backbone's forward with a given prefix state (probes and captures set on it are filled).

        Without a cache and without explicit position_ids, positions count real tokens only, so an
        example's output does not depend on how (left or right) or how much its batch pads it.
        """
        if (
            attention_mask is not None
            and kwargs.get("position_ids") is None
            and kwargs.get("past_key_values") is None
            and kwargs.get("cache") is None
            and self._takes_position_ids
        ):
            kwargs["position_ids"] = positions_from_mask(attention_mask)
        if self.rows:
            state.decoder_query_mask = kwargs.get("decoder_attention_mask")
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **{STATE_KWARG: state}, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, group_ids=None, state: PrefixState | None = None, **kwargs):
        """`generate()` of the backbone with a prefix routed once from the prompt.

        state: a prefix from `prepare` to decode with instead (routed from other text, such as the prompt without
        the demonstration tokens that follow it); its rows are repeated over the input's rows, e.g. b -> (b g).
        """
        if state is None:
            routing, state = self.prepare(input_ids, attention_mask, group_ids)
            self.last_routing = routing
        else:
            state = state.reused()  # the caller's state stays free of generation's caches, for its own forward
        with injection.state_kwarg_allowed(self.backbone):
            return self.backbone.generate(
                input_ids=input_ids, attention_mask=attention_mask, **{STATE_KWARG: state}, **kwargs
            )

    # -- bank initialisation and export ---------------------------------------------------------------
    @torch.no_grad()
    def init_from_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, seed: int = 0) -> None:
        """Set every bank to the keys/values of real tokens drawn from this text (Li & Liang 2021).

        Each expert gets different tokens, so experts start distinct but on the data's key manifold.
        """
        state = PrefixState(kv=None, capture={})
        self.run_backbone(state, input_ids=input_ids, attention_mask=attention_mask)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        real = attention_mask.flatten().nonzero().squeeze(-1)  # positions over (b t)
        routed = self.cfg.num_experts * self.cfg.prefix_len
        need = routed + self.cfg.shared_len  # the shared part's tokens come after the routed banks' ones
        generator = torch.Generator().manual_seed(seed)
        if len(real) >= need:
            pick = real[torch.randperm(len(real), generator=generator)[:need]]
        else:
            pick = real[torch.randint(len(real), (need,), generator=generator)]
        layers = []
        for layer in range(self.dims.num_layers):
            keys, values = state.capture[layer]  # (b h t d)
            kv = torch.stack([keys, values])  # (c b h t d)
            layers.append(rearrange(kv, "c b h t d -> c h (b t) d")[:, :, pick])
        kv = torch.stack(layers, dim=1)  # (c l h n d), n = routed + shared tokens
        self.bank.set_from_activations(
            rearrange(kv[..., :routed, :], "c l h (e p) d -> e l c h p d", e=self.cfg.num_experts)
        )
        if self.shared is not None:
            self.shared.set_from_activations(rearrange(kv[..., routed:, :], "c l h s d -> 1 l c h s d"))

    @torch.no_grad()
    def init_router_kmeans(self, batches, seed: int = 0) -> Tensor:
        """Start the router as a nearest-centroid router over k-means clusters (prefix.router_init=kmeans).

        `batches` yields dicts with input_ids and attention_mask (and group_ids where routing uses them),
        e.g. a sample of the training set; returns each input's cluster (n). Experts thus begin with
        distinct regions of input space instead of hoping a random router separates them.
        """
        features = torch.cat(
            [self.router_features(b["input_ids"], b.get("attention_mask"), b.get("group_ids")) for b in batches]
        )
        return self.router.init_from_kmeans(features, seed)

    def fold(self) -> None:
        """Fold the reparameterisation into plain tensors (for inference and export)."""
        self.bank.fold()
        if self.shared is not None:
            self.shared.fold()

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only what trains (prefix side and any task head); never a frozen backbone tensor."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def detach_backbone(self) -> nn.Module:
        """Give the backbone back with its original attention implementation, to use without the mixture.

        The backbone then computes exactly what it did before `attach` (its parameters stay frozen); the
        mixture no longer reaches attention, so attach again rather than calling it afterwards.
        """
        injection.uninstall(self.backbone, self._previous_attn)
        return self.backbone


def attach(model: nn.Module, cfg: PrefixConfig | None = None, **overrides) -> PrefixMixture:
    """Wrap a loaded transformers model with a mixture of prefix experts; the model is frozen."""
    cfg = cfg or PrefixConfig(**overrides)
    return PrefixMixture(model, cfg)
