"""What the benchmark times: backbones built from configs or assets, batches, training steps, PEFT's prefix."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_prefix.tools.bench_timing import Arm


def load_encoder(name: str) -> nn.Module:
    """A bare encoder (BertModel-like: returns last_hidden_state)."""
    from transformers import AutoModel, BertConfig, BertModel

    sizes = {
        "tiny-bert": dict(
            vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        ),
        # MiniLM's geometry and dropout (the `minilm` asset) with random weights: step times need no weights,
        # and a machine without the asset cache (a GPU box) can still time it.
        "minilm-config": dict(
            vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
        ),
    }
    if name in sizes:
        torch.manual_seed(0)
        return BertModel(BertConfig(**sizes[name], max_position_embeddings=512))
    from moe_prefix.train.assets import resolve_backbone

    return AutoModel.from_pretrained(resolve_backbone(name))


def load_decoder(name: str) -> nn.Module:
    """A causal LM: tiny configs are built in place, anything else is resolved as an asset."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    sizes = {
        "wide-llama": dict(
            vocab_size=8192,
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=1376,
        ),
        "tiny-llama": dict(
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
        ),
        # TinyLlama-1.1B's geometry (32 query / 4 key-value heads), built from its config: no weights needed
        "llama-1.1b": dict(
            vocab_size=32000,
            hidden_size=2048,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            intermediate_size=5632,
        ),
    }
    if name in sizes:
        torch.manual_seed(0)
        cfg = LlamaConfig(**sizes[name], max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return LlamaForCausalLM(cfg)
    from moe_prefix.train.assets import resolve_backbone

    return AutoModelForCausalLM.from_pretrained(resolve_backbone(name))


def make_batch(vocab: int, b: int, t: int, pad: bool, seed: int) -> tuple[Tensor, Tensor]:
    """Random ids (b t) and mask; with pad, row lengths are uniform in t/2..t (row 0 full), right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad:
        lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
        lengths[0] = t
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def pooled_loss(hidden: Tensor, mask: Tensor, head: nn.Module, labels: Tensor) -> Tensor:
    """Sequence classification: masked mean of the last hidden state, a linear head, cross-entropy."""
    w = mask.to(hidden.dtype)[..., None]
    pooled = (hidden * w).sum(1) / w.sum(1).clamp_min(1)
    return F.cross_entropy(head(pooled).float(), labels)


def train_step(params: list[nn.Parameter], loss_fn: Callable[[], Tensor], lr: float = 1e-4):
    """zero_grad + forward + backward + AdamW step, as one callable."""
    opt = torch.optim.AdamW(params, lr=lr)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


def trainable_params(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def count_params(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def try_peft(model: nn.Module, task_type: str, P: int, probe: Callable[[nn.Module], object]):
    """get_peft_model + one call of probe; returns (peft model, None) or (None, error text)."""
    try:
        import peft
    except ImportError as err:
        return None, f"peft not installed ({err})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=P))
            probe(pm)
        return pm, None
    except Exception as err:  # noqa: BLE001 - we report whatever PEFT raises, verbatim
        return None, f"{type(err).__name__}: {err}"


def frozen_forward_arm(backbone: nn.Module, tokens: int, **inputs) -> Arm:
    """The frozen model's no-grad forward on `inputs`: the cost every prefix method adds to."""

    def frozen_forward():
        backbone.eval()
        with torch.no_grad():
            backbone(**inputs)

    return Arm("frozen_forward", frozen_forward, tokens)


def peft_prefix_arm(
    model: nn.Module,
    task_type: str,
    P: int,
    probe: Callable[[nn.Module], object],
    loss: Callable[[nn.Module], Tensor],
    tokens: int,
    head: nn.Module | None = None,
) -> tuple[Arm | None, str | None]:
    """PEFT's prefix tuning of `model` (frozen first) as a timed training step, or (None, why PEFT failed).

    loss(peft_model) is the step's loss; head: a task head that trains beside PEFT's prefix, if any.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    pm, err = try_peft(model, task_type, P, probe)
    if pm is None:
        return None, err
    params = trainable_params(pm, *([head] if head is not None else []))

    def step_loss():
        pm.train()
        return loss(pm)

    return Arm("peft_prefix", train_step(params, step_loss), tokens, count_params(params)), None


@dataclass
class Group:
    name: str
    arms: list[Arm]
    notes: dict = field(default_factory=dict)  # errors, checkpoint sizes, eval lengths ...


def to_bench(module: nn.Module, cfg) -> nn.Module:
    """The module on cfg.device in cfg.dtype (cfg: a BenchConfig, which imports this module)."""
    return module.to(device=cfg.device, dtype=getattr(torch, cfg.dtype))


def load_seq2seq(name: str) -> nn.Module:
    """An encoder-decoder LM: BART-base's or a tiny BART's geometry from a config, else an asset or folder."""
    from transformers import AutoModelForSeq2SeqLM, BartConfig, BartForConditionalGeneration

    sizes = {
        # facebook/bart-base: 6 + 6 layers, 768 wide, 12 heads, FFN 3072, vocabulary 50265, dropout 0.1
        "bart-base-config": dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                                 encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                                 decoder_ffn_dim=3072, max_position_embeddings=1024, dropout=0.1),
        "tiny-bart": dict(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          max_position_embeddings=128),
    }  # fmt: skip
    if name in sizes:
        torch.manual_seed(0)
        return BartForConditionalGeneration(BartConfig(**sizes[name], pad_token_id=1, bos_token_id=0, eos_token_id=2))
    from moe_prefix.train.assets import resolve_backbone

    return AutoModelForSeq2SeqLM.from_pretrained(resolve_backbone(name))
