"""Task networks: a pretrained backbone, adapted by one method, with what the task needs on top.

The method is the mixture of prefix experts (`prefix`) or one of the baselines the ablations compare
against, all trained by the same code: a linear probe (frozen backbone), prompt tuning (a soft prompt
at the input only, Lester et al. 2021), LoRA through PEFT, and full fine-tuning.

Axes: b - batch, t - tokens, m - model width, n - soft-prompt positions.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor, nn

from moe_prefix.config import PrefixConfig
from moe_prefix.mixture import MixtureRouting, attach, positions_from_mask

from .run_config import ModelConfig


class TaskOutput(NamedTuple):
    logits: Tensor  # (b classes) for classification, (b t vocab) for generation, (n vocab) with `logits_at`
    routing: MixtureRouting | None  # None for baselines without a router
    loss: Tensor | None = None  # the backbone's own loss (generation)


class SoftPrompt(nn.Module):
    """n learned input embeddings placed before the tokens (prompt tuning)."""

    def __init__(self, backbone: nn.Module, length: int):
        super().__init__()
        embeddings = backbone.get_input_embeddings()
        # Start from real vocabulary embeddings (Lester et al. found this beats random init).
        # Drawn from the global generator, which the run's seed sets: each seed starts from other tokens.
        rows = torch.randperm(embeddings.weight.shape[0])[:length]
        self.prompt = nn.Parameter(embeddings.weight[rows].detach().clone())

    def forward(self, backbone, input_ids, attention_mask, **kwargs):
        embeds = backbone.get_input_embeddings()(input_ids)
        b, n = embeds.shape[0], self.prompt.shape[0]
        embeds = torch.cat([self.prompt.expand(b, -1, -1).to(embeds.dtype), embeds], 1)
        mask = torch.cat([attention_mask.new_ones(b, n), attention_mask], 1)
        out = backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask), **kwargs)
        return out, n


def _adapt(backbone: nn.Module, model_cfg: ModelConfig, prefix_cfg: PrefixConfig) -> nn.Module:
    """Freeze or wrap the backbone according to model.method."""
    method = model_cfg.method
    backbone.requires_grad_(method == "full")
    if method == "prefix":
        return attach(backbone, prefix_cfg)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=model_cfg.lora_rank, lora_alpha=2 * model_cfg.lora_rank, target_modules="all-linear")
        return get_peft_model(backbone, lora)
    return backbone


def _pool(hidden: Tensor, mask: Tensor, how: str) -> Tensor:
    """(b t m), (b t) -> (b m)."""
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        last = mask.long().cumsum(-1).argmax(-1)  # position of the last real token, whatever the padding side
        return hidden[torch.arange(hidden.shape[0]), last]
    w = mask.to(hidden.dtype)[..., None]
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1)


class SequenceClassifier(nn.Module):
    """Backbone (adapted) -> pooled last hidden state -> linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int, model_cfg: ModelConfig, prefix_cfg: PrefixConfig):
        super().__init__()
        self.method = model_cfg.method
        self.pooling = model_cfg.pooling
        hidden = backbone.get_input_embeddings().weight.shape[1]
        if getattr(backbone.config, "hidden_size", None):
            hidden = backbone.config.hidden_size
        self.prompt = SoftPrompt(backbone, model_cfg.prompt_len) if self.method == "prompt" else None
        self.body = _adapt(backbone, model_cfg, prefix_cfg)
        self.head = nn.Linear(hidden, num_classes)

    @property
    def mixture(self):
        return self.body if self.method == "prefix" else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, group_ids: Tensor | None = None) -> TaskOutput:
        routing = None
        if self.method == "prefix":
            out = self.body(input_ids=input_ids, attention_mask=attention_mask, group_ids=group_ids)
            routing = out.routing
        elif self.prompt is not None:
            out, n = self.prompt(self.body, input_ids, attention_mask)
            out.last_hidden_state = out.last_hidden_state[:, n:]
        else:
            positions = positions_from_mask(attention_mask)
            out = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        pooled = _pool(out.last_hidden_state, attention_mask, self.pooling)
        return TaskOutput(self.head(pooled), routing)


@contextlib.contextmanager
def output_layer_at(output_layer: nn.Module, positions: Tensor | None):
    """Within the block, `output_layer` maps only the hidden states at `positions` (b t, bool) to the vocabulary:
    its (b t m) input becomes (1 n m), so the model returns (1 n vocab) logits, in row-major order of `positions`.

    Why: training scores the target tokens only, about a third of a prompt + target pair on gem4, yet a causal
    LM's output layer maps every position (Gemma 3: 262,144 words x 640, more multiply-adds per token than its
    18 layers together). Gathering the layer's input, not its output, skips that work; what a model does after
    the layer (Gemma's logit soft-capping) is elementwise and still applies to the kept positions.
    """
    if positions is None:
        yield
        return
    handle = output_layer.register_forward_pre_hook(lambda _module, args: (args[0][positions][None], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


class CausalLM(nn.Module):
    """A causal LM adapted by one method; the loss covers target tokens only (labels -100 elsewhere).

    An encoder-decoder LM (BART, T5) works the same way: input_ids are then the encoder's and labels the
    decoder's, which the backbone shifts into decoder inputs itself.
    """

    def __init__(self, backbone: nn.Module, model_cfg: ModelConfig, prefix_cfg: PrefixConfig):
        super().__init__()
        self.method = model_cfg.method
        self.seq2seq = bool(getattr(backbone.config, "is_encoder_decoder", False))
        if self.method == "prompt":
            raise ValueError("model.method=prompt is not supported for generation; use prefix, lora or full")
        # a plain tuple: the layer is already a submodule of the backbone and must not be registered twice
        self._output_layer = (backbone.get_output_embeddings(),)
        self.body = _adapt(backbone, model_cfg, prefix_cfg)

    @property
    def mixture(self):
        return self.body if self.method == "prefix" else None

    def forward(
        self,
        input_ids,
        attention_mask,
        labels=None,
        router_input_ids=None,
        router_attention_mask=None,
        group_ids=None,
        logits_at=None,
    ):
        """router_* carry the prompt alone, so the router never sees the target; group_ids: oracle routing.

        logits_at (b t, bool; decoder-only models): compute logits at these positions only, returned as (n vocab).
        """
        if logits_at is not None and self.seq2seq:
            raise ValueError("logits_at applies to decoder-only models: a decoder's labels hold the target alone")
        at = output_layer_at(self._output_layer[0], logits_at)
        if self.method == "prefix":
            routing, state = self.body.prepare(router_input_ids, router_attention_mask, group_ids)
            # The router read the prompt; attention's queries are the whole sequence. With the prompt's mask here
            # the split path could not recognise a right-padded causal batch and would skip flash's is_causal.
            state.query_mask = attention_mask
            with at:
                out = self.body.run_backbone(state, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            return TaskOutput(_unbatch(out.logits, logits_at), routing, out.loss)
        # encoder-decoder models place their tokens themselves (BART, T5 take no position_ids)
        positions = {} if self.seq2seq else {"position_ids": positions_from_mask(attention_mask)}
        with at:
            out = self.body(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **positions)
        return TaskOutput(_unbatch(out.logits, logits_at), None, out.loss)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, group_ids=None, **kwargs):
        if self.method == "prefix":
            return self.body.generate(input_ids, attention_mask=attention_mask, group_ids=group_ids, **kwargs)
        return self.body.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def _unbatch(logits: Tensor, logits_at: Tensor | None) -> Tensor:
    """(1 n vocab) -> (n vocab) when the output layer mapped selected positions only."""
    return logits if logits_at is None else logits[0]


def trainable_state_dict(network: nn.Module) -> dict[str, Tensor]:
    """The parameters that train (never a frozen backbone tensor), by name."""
    return {name: p.detach() for name, p in network.named_parameters() if p.requires_grad}
