"""Moving prefixes between PEFT prefix-tuning adapters and moe_prefix banks.

Axes: e - experts, l - layers, c - key/value (0 keys, 1 values), h - key/value heads, p - prefix
positions, d - head dim, r - width of PEFT's reparameterisation embedding.

PEFT's adapter folder (peft 0.17-0.21) holds `adapter_config.json` and `adapter_model.safetensors` with
one tensor, `prompt_embeddings`, of shape (p, l*2*h*d). Its flat axis is `(l c h d)`: PEFT views it as
(p, 2l, h, d), moves the 2l axis first and splits it into (key, value) pairs per layer, so key and
value of layer l sit at 2l and 2l+1. For grouped-query models h is the number of key/value heads and
`token_dim` = h*d, the same head count our banks use.

`prefix_projection=True` (Li & Liang's reparameterisation MLP, tanh between two linears) changes only
training: PEFT's `save_pretrained` writes the MLP's output, so the folder is read like a plain one. A
folder holding the raw prompt-encoder weights (`embedding.weight`, `transform.{0,2}.{weight,bias}`,
e.g. from a full training checkpoint) is projected here with the same MLP.

Encoder-decoder models (task_type SEQ_2_SEQ_LM, num_transformer_submodules=2): the same (p (l c h d))
tensor, its l = L key/value pairs read by PEFT's `get_prompt` in an unexpected order. It views them as
(2L) keys-and-values, concatenates that with itself and cuts it into L chunks of four, (self key, self value,
cross key, cross value) for decoder layer i: so layer i's self-attention reads pair (2i mod L) and its
cross-attention pair (2i+1 mod L) (`seq2seq_pair`). With L even, layers i and i+L/2 share their prefixes.
The encoder gets none. With transformers 5.x (checked with peft 0.21.2 and transformers 5.24) only the
self-attention part takes effect in a forward pass (the cross-attention cache PEFT builds arrives empty),
and `generate()` drops the prefix altogether (PEFT passes `past_key_values`, which transformers now calls
`cache`, and the empty cache generate() made wins). Imports therefore fill the decoder self-attention
rows (prefix.sites=["decoder"], which reproduces PEFT's forward logits) and, when asked, the
cross-attention rows with the pairs PEFT's layout assigns them.

Position convention: PEFT feeds its prefix through the key/value cache, so the real tokens sit at
positions P..P+T-1 (P = num_virtual_tokens) whatever the padding. moe_prefix keeps real tokens at
0..T-1 (padding-invariant, needed for per-example lengths). The prefix keys carry no position in
either case, but the queries (rotary) and the input embeddings (absolute positions, GPT-2) do. To
reproduce PEFT's logits exactly, pass `position_ids=peft_position_ids(input_ids, P)` to the mixture.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import BackboneDims, PrefixConfig
from .mixture import PrefixMixture, attach

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PROMPT_KEY = "prompt_embeddings"  # the key PEFT's save_pretrained / from_pretrained use for prompt learning
_ENCODER_KEYS = (
    "embedding.weight",
    "transform.0.weight",
    "transform.0.bias",
    "transform.2.weight",
    "transform.2.bias",
)

PathLike = str | os.PathLike


def peft_position_ids(input_ids: Tensor, num_virtual_tokens: int) -> Tensor:
    """Positions PEFT gives real tokens behind a prefix of P virtual tokens: P..P+T-1 on every row (b t)."""
    b, t = input_ids.shape
    return torch.arange(num_virtual_tokens, num_virtual_tokens + t, device=input_ids.device).expand(b, t)


# -- reading ------------------------------------------------------------------------------------------
def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: {CONFIG_NAME} is missing")
    config = json.loads(path.read_text())
    peft_type = config.get("peft_type")
    if peft_type != "PREFIX_TUNING":
        raise ValueError(
            f"{folder} holds a {peft_type} adapter; only PEFT prefix tuning (peft_type=PREFIX_TUNING) "
            "maps onto prefix banks"
        )
    if config.get("num_transformer_submodules", 1) not in (1, 2):
        raise ValueError(
            f"{folder}: num_transformer_submodules={config['num_transformer_submodules']} is neither 1 "
            "(a single stack) nor 2 (an encoder-decoder model)"
        )
    for key in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim"):
        if not isinstance(config.get(key), int):
            raise ValueError(f"{folder}/{CONFIG_NAME} lacks an integer {key!r}")
    return config


def _read_weights(folder: Path) -> dict[str, Tensor]:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("adapter_model.*"))
        hint = f" (found {', '.join(found)}; re-save with save_pretrained(..., safe_serialization=True))"
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}{hint if found else ''}; only safetensors is read")
    return load_file(str(path))


def _project(weights: dict[str, Tensor], folder: Path) -> Tensor:
    """PEFT's PrefixEncoder with prefix_projection: Linear -> tanh -> Linear over a (p r) embedding."""
    found = {}
    for suffix in _ENCODER_KEYS:
        matches = [k for k in weights if k == suffix or k.endswith("." + suffix)]
        if len(matches) != 1:
            raise ValueError(
                f"{folder}/{WEIGHTS_NAME} has neither {PROMPT_KEY!r} nor exactly one prompt-encoder "
                f"'{suffix}' (keys: {sorted(weights)})"
            )
        found[suffix] = weights[matches[0]].float()
    hidden = torch.tanh(found["embedding.weight"] @ found["transform.0.weight"].T + found["transform.0.bias"])
    return hidden @ found["transform.2.weight"].T + found["transform.2.bias"]  # (p (l c h d))


def seq2seq_pair(site: str, layer: int, num_layers: int) -> int:
    """The key/value pair of a PEFT seq2seq prefix that decoder `layer`'s self- or cross-attention reads."""
    return (2 * layer + (site == "cross")) % num_layers


def load_peft_prefix(folder: PathLike, dims: BackboneDims | None = None) -> tuple[Tensor, dict]:
    """Read a PEFT prefix-tuning adapter folder: the prefix (l c h p d) and the adapter config (a dict).

    dims: the target backbone's geometry (`BackboneDims.from_config(model.config)`); when given, a prefix
    made for another backbone raises ValueError naming both shapes. Prefixes of adapters trained with
    `prefix_projection=True` come back already projected (a plain tensor).
    """
    folder = Path(folder)
    config = _read_config(folder)
    weights = _read_weights(folder)
    flat = weights[PROMPT_KEY] if PROMPT_KEY in weights else _project(weights, folder)
    p, layers, heads = config["num_virtual_tokens"], config["num_layers"], config["num_attention_heads"]
    head_dim = config["token_dim"] // heads
    shape = (layers, 2, heads, p, head_dim)
    if flat.shape != (p, layers * 2 * heads * head_dim):
        raise ValueError(
            f"{folder}: prefix tensor {tuple(flat.shape)} does not match its config "
            f"(num_virtual_tokens={p}, num_layers={layers}, num_attention_heads={heads}, "
            f"token_dim={config['token_dim']}: expected {(p, layers * 2 * heads * head_dim)})"
        )
    if dims is not None:
        expected = (dims.num_layers, 2, dims.num_kv_heads, p, dims.head_dim)
        if shape != expected:
            raise ValueError(
                f"{folder}: adapter prefix (l c h p d) = {shape} does not fit this backbone, which needs "
                f"{expected} ({dims.num_layers} layers, {dims.num_kv_heads} key/value heads of size "
                f"{dims.head_dim})"
            )
    kv = rearrange(flat, "p (l c h d) -> l c h p d", l=layers, c=2, h=heads)
    return kv.contiguous(), config


# -- importing into a mixture -------------------------------------------------------------------------
def attach_peft_adapters(
    model: nn.Module,
    folders: PathLike | Sequence[PathLike],
    cfg: PrefixConfig | None = None,
    **overrides,
) -> PrefixMixture:
    """Wrap a base model with a mixture whose experts are PEFT prefix-tuning adapters.

    One folder gives a one-expert mixture (PEFT's adapter, unchanged). On an encoder-decoder model the
    default is prefix.sites=["decoder"], the one site PEFT's prefix reaches; sites=["decoder", "cross"]
    also puts each layer's prefix into cross-attention, as PEFT's cache layout intends. Several folders become the
    experts of one mixture, in the order given, behind a fresh router ("upcycling"); train the router
    (and optionally the banks) afterwards. All adapters must have the same num_virtual_tokens.

    model: the base transformers model (a PeftModel is unwrapped to its base model).
    cfg / overrides: the mixture's PrefixConfig; by default num_experts = number of folders,
    prefix_len = num_virtual_tokens, top_k = 1 (each input gets one adapter as it was trained).
    Overrides apply on top of these defaults when no cfg is given.
    """
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    if not folders:
        raise ValueError("attach_peft_adapters needs at least one adapter folder")
    dims = BackboneDims.from_config(model.config)
    loaded = [load_peft_prefix(folder, dims) for folder in folders]
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    for folder, (_, config) in zip(folders, loaded, strict=True):
        if (config.get("num_transformer_submodules", 1) == 2) != seq2seq:
            kind = "an encoder-decoder" if seq2seq else "a single-stack"
            raise ValueError(
                f"{folder}: num_transformer_submodules={config.get('num_transformer_submodules', 1)} does not fit "
                f"{kind} model ({type(model).__name__})"
            )
    lengths = {str(folder): kv.shape[-2] for folder, (kv, _) in zip(folders, loaded, strict=True)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"all adapters must share num_virtual_tokens to become experts of one bank: {lengths}")
    P = next(iter(lengths.values()))
    if cfg is None:
        defaults = {"num_experts": len(folders), "prefix_len": P, "top_k": 1}
        if seq2seq:
            defaults["sites"] = ("decoder",)
        cfg = PrefixConfig(**{**defaults, **overrides})
    elif overrides:
        raise ValueError("pass either a PrefixConfig or keyword overrides, not both")
    if cfg.num_experts != len(folders) or cfg.prefix_len != P:
        raise ValueError(
            f"PrefixConfig(num_experts={cfg.num_experts}, prefix_len={cfg.prefix_len}) does not match "
            f"{len(folders)} adapter(s) of {P} virtual tokens"
        )
    if cfg.reparam or cfg.expert_rank:
        raise ValueError("imported prefixes are plain tensors: use reparam=False and expert_rank=0")
    if seq2seq and "encoder" in cfg.sites:
        raise ValueError("a PEFT seq2seq prefix has no encoder part: use prefix.sites among decoder, cross")
    mixture = attach(model, cfg)
    banks = torch.stack([kv for kv, _ in loaded])  # (e l c h p d)
    if mixture.rows:  # PEFT's seq2seq layout: decoder layer i's site reads pair seq2seq_pair(site, i, L)
        banks = banks[:, [seq2seq_pair(site, layer, banks.shape[1]) for site, layer in mixture.rows]]
    mixture.bank.set_from_activations(banks)
    return mixture


# -- exporting to PEFT --------------------------------------------------------------------------------
def _task_type(model: nn.Module) -> str:
    name = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


def _seq2seq_pairs(mixture: PrefixMixture, bank: Tensor) -> Tensor:
    """An encoder-decoder bank (e rows c h p d) in PEFT's seq2seq layout of L pairs (e l c h p d)."""
    sites = mixture.cfg.sites
    if "encoder" in sites:
        raise ValueError(
            f"prefix.sites={list(sites)}: a PEFT seq2seq adapter has no encoder prefix; export a mixture with "
            "sites among decoder, cross"
        )
    L = 1 + max(layer for _, layer in mixture.rows)
    pairs: list[Tensor | None] = [None] * L
    for row, (site, layer) in enumerate(mixture.rows):
        j = seq2seq_pair(site, layer, L)
        if pairs[j] is not None and not torch.equal(pairs[j], bank[:, row]):
            raise ValueError(
                f"PEFT's seq2seq layout gives {site} layer {layer} the same prefix (pair {j}) as another site "
                "or layer whose prefix differs here: no PEFT adapter equals this mixture"
            )
        pairs[j] = bank[:, row]
    unused = [j for j, pair in enumerate(pairs) if pair is None]
    if unused:
        warnings.warn(
            f"pairs {unused} of the PEFT seq2seq layout belong to sites this mixture has no prefix on; they are "
            "written as zeros (PEFT 0.21 with transformers 5.x reads decoder self-attention pairs only)",
            stacklevel=3,
        )
    zeros = torch.zeros_like(bank[:, 0])
    return torch.stack([zeros if pair is None else pair for pair in pairs], 1)


def _exported_prefix(mixture: PrefixMixture, expert: int | None, routing) -> Tensor:
    """The (l c h p d) prefix a fixed choice produces at evaluation, truncated to its hard length, behind the
    shared positions where the mixture has them."""
    cfg = mixture.cfg
    if cfg.prefix_mode != "softmax":
        raise ValueError("prefix_mode=decoupled adds its experts outside the softmax: no PEFT prefix equals it")
    if cfg.length == "learned":
        raise ValueError("length=learned chooses a length per input: no single PEFT prefix equals it")
    if (expert is None) == (routing is None):
        if cfg.num_experts == 1 and expert is None:
            expert = 0
        else:
            raise ValueError("give exactly one of expert (an index) or routing (a weight per expert)")
    with torch.no_grad():
        bank = mixture.bank.tensor().detach()  # folds a reparameterised bank without touching the mixture
    if mixture.rows:
        bank = _seq2seq_pairs(mixture, bank)
    E, P = cfg.num_experts, cfg.prefix_len
    if expert is not None:
        if not 0 <= expert < E:
            raise ValueError(f"expert={expert} is not in 0..{E - 1}")
        weights = torch.zeros(E, dtype=torch.float32).index_fill(0, torch.tensor(expert), 1.0)
    else:
        if cfg.combine != "blend":
            raise ValueError(
                "a fixed routing exports the blended prefix (combine=blend); concat weights are attention "
                "biases that a plain PEFT prefix cannot hold: export single experts instead"
            )
        weights = torch.as_tensor(routing, dtype=torch.float32).flatten().cpu()
        if weights.shape != (E,) or (weights < 0).any() or abs(weights.sum().item() - 1) > 1e-4:
            raise ValueError(f"routing must hold {E} non-negative weights summing to one, got {routing}")
    if expert is not None:
        kv = bank[expert]
    else:
        kv = torch.einsum("e,elchpd->lchpd", weights.to(bank), bank)
    length = P
    if cfg.length == "expert":
        # Evaluation keeps round(sum_e w_e n_e) positions for a blend (LengthController), n_e for one bank.
        per_bank = torch.tensor(cfg.expert_lengths, dtype=torch.float32)
        length = int((weights * per_bank).sum().round().item())
    kv = kv[..., :length, :]
    if mixture.shared is not None:  # every input attends to the shared positions with weight one, as PEFT's do
        with torch.no_grad():
            shared = mixture.shared.tensor().detach()
        if mixture.rows:
            shared = _seq2seq_pairs(mixture, shared)
        kv = torch.cat([shared[0].to(kv), kv], -2)
    if kv.shape[-2] == 0:
        raise ValueError("the chosen experts have prefix length 0: there is nothing to export")
    return kv


def export_peft_adapter(
    mixture: PrefixMixture,
    folder: PathLike,
    expert: int | None = None,
    routing: Sequence[float] | Tensor | None = None,
    task_type: str | None = None,
) -> Path:
    """Write a PEFT prefix-tuning adapter folder that `PeftModel.from_pretrained(base, folder)` loads.

    expert: export this bank as it is; routing: a weight per expert (non-negative, summing to one),
    exporting the blended prefix sum_e w_e bank_e that combine=blend produces for that routing. With
    length=expert the prefix is cut to the length evaluation would keep. A reparameterised bank is
    exported folded. task_type defaults from the model class (CAUSAL_LM, SEQ_CLS, ...). A trained task
    head (cfg.train_modules) is not part of a prefix-tuning adapter and is not exported. An encoder-decoder
    mixture exports a SEQ_2_SEQ_LM adapter in PEFT's layout (see the module docstring), when the prefixes that
    layout makes one are equal here; pairs of sites without a prefix are written as zeros, with a warning.

    Positions: PEFT will place real tokens at P..P+T-1, P the exported length; our mixture reproduces
    the exported adapter's logits with `position_ids=peft_position_ids(input_ids, P)`.
    """
    folder = Path(folder)
    kv = _exported_prefix(mixture, expert, routing)
    layers, _, heads, p, head_dim = kv.shape
    if mixture.cfg.train_modules:
        warnings.warn(
            f"trained backbone modules {mixture.cfg.train_modules} are not exported; PEFT will load only the prefix",
            stacklevel=2,
        )
    backbone = mixture.backbone
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": task_type or _task_type(backbone),
        "num_virtual_tokens": p,
        "num_layers": layers,
        "num_attention_heads": heads,  # key/value heads, as PEFT stores them for grouped-query models
        "token_dim": heads * head_dim,
        "encoder_hidden_size": heads * head_dim,
        "num_transformer_submodules": 2 if mixture.rows else 1,
        "prefix_projection": False,  # the prefix is stored as the tensor it is
        "inference_mode": True,
        "base_model_name_or_path": getattr(backbone.config, "_name_or_path", None) or None,
        "revision": None,
        "modules_to_save": None,
        "init_weights": None,
        "auto_mapping": None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    flat = rearrange(kv, "l c h p d -> p (l c h d)").detach().cpu().contiguous()
    save_file({PROMPT_KEY: flat}, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder
