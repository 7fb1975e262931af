"""Run configuration: typed dataclass defaults, then a YAML file, then command-line overrides.

OmegaConf merges the three layers (and parses `key=value` dotlists); the merged result is checked
against the dataclasses here: unknown keys (with the nearest valid key suggested), wrong types and
invalid values all fail with one line naming the key, before any model or data loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_prefix.config import PrefixConfig

TASKS = ("classification", "generation")
METHODS = ("prefix", "linear_probe", "prompt", "lora", "full", "none")
POOLINGS = ("mean", "cls", "last")
SCHEDULES = ("onecycle", "cosine", "constant")
OBJECTIVES = ("sft", "rft", "prefix_rft")
# trainer.loggers: csv needs nothing and is always on; each other one needs the package, and pip extra, of its name.
LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")


class ConfigError(ValueError):
    """A configuration a run cannot start from; the message names the key and what would be valid."""


@dataclass
class ModelConfig:
    backbone: str = "minilm"  # alias (minilm, smollm2-135m), hub id or local folder
    task: str = "classification"  # classification: pooled hidden state -> linear head; generation: causal LM
    method: str = "prefix"  # prefix (the mixture), or a baseline: linear_probe, prompt, lora, full; none (generation):
    # the backbone as shipped, nothing trained: the run validates it once (zero-shot, or few-shot with data.few_shot)
    pooling: str = "mean"  # classification head input: mean of real tokens, first token (cls) or last token
    max_length: int = 64  # tokens per input; longer texts are truncated (with one warning)
    prompt_len: int = 16  # soft-prompt length (method=prompt)
    lora_rank: int = 8  # method=lora
    gradient_checkpointing: bool = False
    init_from: str | None = None  # a finished run's directory: start from its trained weights (SFT -> prefix_rft)

    def __post_init__(self) -> None:
        for key, choices in (("task", TASKS), ("method", METHODS), ("pooling", POOLINGS)):
            if getattr(self, key) not in choices:
                raise ConfigError(f"model.{key}={getattr(self, key)!r} is not one of {', '.join(choices)}")
        if self.max_length < 1:
            raise ConfigError(f"model.max_length must be >= 1, got {self.max_length}")


@dataclass
class DataConfig:
    source: str = "vader_domains"  # an alias, .csv/.tsv/.jsonl/.parquet, a save_to_disk folder or hf:NAME[/CONFIG]
    val_source: str | None = None  # a separate validation source; else source's val_split, else a seeded split
    train_split: str = "train"  # the split to train on when the source has several (a DatasetDict or hub dataset)
    val_split: str | None = "validation"  # the split to validate on; when absent (or null): a seeded split of train
    val_fraction: float = 0.2
    split_seed: int = 0  # the split stays fixed when the training seed changes
    text_column: str = "text"
    label_column: str = "label"
    group_column: str | None = "group"  # domain/task for routing analysis and per-group metrics; null if none
    batch_size: int = 32
    eval_batch_size: int = 128
    max_train_examples: int | None = None  # a seeded subsample, for quick runs
    max_val_examples: int | None = None
    prompt_format: str = "{input}\n"  # generation: text the target follows
    few_shot: int = 0  # generation with model.method=none: k demonstrations (a training input's prompt and its first
    # reference) drawn with split_seed from the training inputs of the same source, before every validation prompt
    num_workers: int = 0
    drop_empty_texts: bool = False  # drop rows whose text (generation: input) is empty; a warning counts them anyway

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must lie strictly between 0 and 1, got {self.val_fraction}")
        for key in ("batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.few_shot < 0:
            raise ConfigError(f"data.few_shot must be >= 0 (demonstrations per prompt), got {self.few_shot}")


@dataclass
class OptimConfig:
    lr: float = 5e-3
    weight_decay: float = 0.0
    schedule: str = "onecycle"  # onecycle (warm-up then cosine decay), cosine, constant
    warmup_fraction: float = 0.1
    head_lr: float | None = None  # learning rate of a new task head; null: the same as lr
    router_lr: float | None = None  # learning rate of the router (its own parameter group); null: the same as lr
    objective: str = "sft"  # generation: sft (cross-entropy on references), rft (GRPO on sampled texts) or
    # prefix_rft (rft where part of each group continues a demonstration's prefix; Huang et al. 2025); see `rl`

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"optim.objective={self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")


def _trainer_defaults() -> dict[str, Any]:
    return {
        "max_epochs": 1,
        "max_steps": -1,
        "accelerator": "cpu",
        "devices": 1,
        "precision": "32-true",
        "log_every_n_steps": 20,
        "gradient_clip_val": 1.0,
        "deterministic": True,
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,  # our sampler shards itself, keeping 1-process and DDP runs identical
    }


@dataclass
class GenerationConfig:
    max_new_tokens: int = 48
    num_beams: int = 1  # 1: greedy
    num_samples_saved: int = 20  # generations written next to their references in the run directory


@dataclass
class RLConfig:
    """Reinforcement fine-tuning of generation runs (optim.objective=rft or prefix_rft; moe_prefix/train/rft.py)."""

    group_size: int = 4  # G samples per input; each one's advantage is its reward against its group's (GRPO)
    clip: float = 0.2  # PPO clip range eps: the ratio pi / pi_old counts only within [1 - eps, 1 + eps]
    scale_advantages: bool = True  # divide by the group's reward std (GRPO); false: mean-centred only (Dr. GRPO)
    temperature: float = 1.0  # sampling temperature; the trained log-probabilities use the same one
    max_new_tokens: int = 48  # tokens sampled per rollout, after its demonstration prefix (if any)
    bleu_weight: float = 0.0  # reward = -SER + bleu_weight * sentence BLEU / 100 against the input's references
    demo_share: float = 0.25  # prefix_rft: share of each group (rounded) that continues a demonstration prefix
    demo_max_fraction: float = 0.95  # prefix_rft: the prefix-length bound starts at this share of the reference
    demo_min_fraction: float = 0.05  # ... and decays to this one by a cosine over training; lengths ~ U(min, bound)
    entropy_top_fraction: float = 0.2  # prefix_rft: only the highest-entropy share of demonstration tokens trains
    sft_weight: float = 0.0  # likelihood anchor: + sft_weight * the batch references' cross-entropy (SFT's loss)
    rollouts_saved: int = 4  # rollouts.jsonl keeps every rollout of this many last training steps

    def __post_init__(self) -> None:
        hi = self.demo_max_fraction
        checks = (
            ("group_size", self.group_size >= 2, "must be >= 2 (advantages compare samples within a group)"),
            ("clip", 0 < self.clip < 1, "must lie strictly between 0 and 1"),
            ("temperature", self.temperature > 0, "must be > 0"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("bleu_weight", self.bleu_weight >= 0, "must be >= 0"),
            ("demo_share", 0 <= self.demo_share <= 1, "must lie in [0, 1]"),
            ("demo_max_fraction", 0 < self.demo_max_fraction <= 1, "must lie in (0, 1]"),
            ("demo_min_fraction", 0 <= self.demo_min_fraction <= hi, f"must lie in [0, rl.demo_max_fraction={hi}]"),
            ("entropy_top_fraction", 0 < self.entropy_top_fraction <= 1, "must lie in (0, 1]"),
            ("sft_weight", self.sft_weight >= 0, "must be >= 0"),
            ("rollouts_saved", self.rollouts_saved >= 0, "must be >= 0"),
        )
        for key, ok, rule in checks:
            if not ok:
                raise ConfigError(f"rl.{key}={getattr(self, key)!r} {rule}")


@dataclass
class TrackingConfig:
    """Where the wandb and mlflow trackers (chosen by trainer.loggers) file a run."""

    project: str = "moe_prefix"  # W&B project; also the MLflow experiment when group is null
    group: str | None = None  # W&B group and MLflow experiment: the ablation runner sets the sweep's name
    tags: dict[str, Any] = field(default_factory=dict)  # W&B tags (as key=value) and MLflow tags; sweeps: arm, seed
    mlflow_uri: str | None = None  # null: MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db here)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Keyword arguments of lightning.Trainer, and `loggers`: trackers among csv (always on), tensorboard, wandb,
    # mlflow; when not given, csv and (if installed) tensorboard.
    trainer: dict[str, Any] = field(default_factory=_trainer_defaults)
    seed: int = 0
    threads: int | None = None  # torch CPU threads; 1 is faster on a busy 2-core machine; null: torch's default
    run_dir: str | None = None  # null: runs/<config name>-<time>
    name: str = "run"
    checkpoint_every_n_steps: int = 50  # step checkpoints for --resume (besides the end of each epoch)
    # CPU data-parallel runs (trainer.strategy=ddp, gloo): seconds a collective waits for a peer process (also
    # its start-up, loading included) before the run stops, resumable; Lightning's own default is 30 minutes.
    ddp_timeout_s: float = 300.0


# -- checking ---------------------------------------------------------------------------------------


def _unknown_key(path: str, key: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {path}{near[0]}?)" if near else ""
    return ConfigError(f"unknown config key {path}{key}{hint}; valid keys: {', '.join(sorted(valid))}")


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (tuple, list):
        inner = typing.get_args(annotation)[:1]
        return isinstance(value, (list, tuple)) and all(_type_ok(v, inner[0]) for v in value) if inner else True
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build(cls, values: dict, path: str):
    """Instantiate dataclass cls from a plain dict, checking keys and types first."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(path, key, names)
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}{key} must be a section (mapping), got {value!r}")
            kwargs[key] = _build(annotation, value, f"{path}{key}.")
            continue
        if not _type_ok(value, annotation):
            raise ConfigError(f"{path}{key}={value!r} has the wrong type: expected {_type_name(annotation)}")
        if annotation is float or (
            typing.get_origin(annotation) in (typing.Union, types.UnionType)
            and float in typing.get_args(annotation)
            and isinstance(value, int)
        ):
            value = float(value) if value is not None else None
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_trainer(trainer: dict[str, Any]) -> None:
    import lightning

    if "logger" in trainer:  # moe_prefix builds Lightning's loggers itself, from trainer.loggers
        raise ConfigError("trainer.logger is set by moe_prefix; choose trackers with trainer.loggers=[csv,wandb]")
    accepted = [p for p in inspect.signature(lightning.Trainer.__init__).parameters if p != "self"]
    for key in trainer:
        if key not in accepted and key != "loggers":
            raise _unknown_key("trainer.", key, [*accepted, "loggers"])
    trainer["loggers"] = resolved_loggers(trainer)


def resolved_loggers(trainer: dict[str, Any]) -> list[str]:
    """The trackers a run logs to, checked (a config saved on another machine may name one missing here)."""
    return check_loggers(trainer["loggers"]) if "loggers" in trainer else default_loggers()


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None  # finds the package without importing it


def default_loggers() -> list[str]:
    """csv, and tensorboard when it is installed (what a run logs when trainer.loggers is not given)."""
    return ["csv", *(["tensorboard"] if _installed("tensorboard") else [])]


def check_loggers(value: Any) -> list[str]:
    """trainer.loggers as a list that starts with csv; a tracker that is not installed names its pip extra."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"trainer.loggers={value!r} must be a list such as [csv,wandb]; choose from {', '.join(LOGGERS)}"
        )
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"trainer.loggers: unknown tracker {name!r}; choose from {', '.join(LOGGERS)}")
        if name != "csv" and not _installed(name):
            raise ConfigError(
                f'trainer.loggers: {name} is not installed; install its extra: pip install -e ".[{name}]"'
            )
    return list(dict.fromkeys(["csv", *names]))  # csv first and once: analysis reads logs/metrics.csv


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- `key=value` overrides, checked; raises ConfigError on any problem."""
    from omegaconf import OmegaConf  # here, not at the top: `moe-prefix --help` does without it

    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as err:  # yaml errors carry line and column
            raise ConfigError(f"cannot parse {path}: {err}") from None
        if layers[-1] is None or not isinstance(OmegaConf.to_container(layers[-1]), dict):
            raise ConfigError(f"{path} must hold a mapping of config sections")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (for example prefix.top_k=2)")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides or [])))
        user = OmegaConf.to_container(OmegaConf.merge(*layers), resolve=True) if layers else {}
    except Exception as err:
        raise ConfigError(f"cannot read config overrides: {err}") from None
    if path is not None and "name" not in user:
        user["name"] = path.stem
    trainer = {**_trainer_defaults(), **(user.pop("trainer", None) or {})}
    _check_trainer(trainer)
    cfg = _build(RunConfig, user, "")
    cfg.trainer = trainer
    _check_cross(cfg)
    return cfg


def _check_cross(cfg: RunConfig) -> None:
    """Checks that span sections."""
    if cfg.ddp_timeout_s <= 0:
        raise ConfigError(f"ddp_timeout_s={cfg.ddp_timeout_s} must be > 0 (seconds a collective waits for a peer)")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads={cfg.threads} must be at least 1 (or null for torch's default)")
    if cfg.model.task == "generation" and cfg.data.source == "vader_domains":
        raise ConfigError("model.task=generation needs a generation dataset such as data.source=e2e_nlg")
    if cfg.optim.objective != "sft" and cfg.model.task != "generation":
        raise ConfigError(f"optim.objective={cfg.optim.objective} needs model.task=generation (classification: sft)")
    # generation reads the group from the built-in GEM records themselves (checked when the data loads)
    if cfg.prefix.router_input == "group" and cfg.data.group_column is None and cfg.model.task != "generation":
        raise ConfigError("prefix.router_input=group needs data.group_column (the column holding group ids)")
    _check_untrained(cfg)
    if cfg.model.method == "prefix" and cfg.prefix.expert_init == "upcycle" and not cfg.model.init_from:
        raise ConfigError(
            "prefix.expert_init=upcycle copies a trained one-expert prefix into every expert: set model.init_from "
            "to that run's directory (in a sweep: model.init_from=@arm)"
        )


def _check_untrained(cfg: RunConfig) -> None:
    """model.method=none (nothing trains) and data.few_shot (demonstrations in the prompt, for such runs only)."""
    method, k = cfg.model.method, cfg.data.few_shot
    if method == "none":
        if cfg.model.task != "generation":
            raise ConfigError(
                "model.method=none trains nothing, so a classification head would stay random; it needs "
                "model.task=generation (classification: model.method=linear_probe trains the head alone)"
            )
        if cfg.optim.objective != "sft":
            raise ConfigError(
                f"model.method=none trains nothing; optim.objective={cfg.optim.objective} needs a method that trains"
            )
        if cfg.model.init_from:
            raise ConfigError("model.method=none evaluates the backbone as shipped; drop model.init_from")
    if k and (cfg.model.task != "generation" or method != "none"):
        raise ConfigError(
            f"data.few_shot={k} puts demonstrations before generation prompts of runs that train nothing: set "
            f"model.task=generation and model.method=none (got task={cfg.model.task}, method={method}); a trained "
            "method would meet the demonstrations at validation only"
        )
    if k and cfg.model.max_length <= cfg.generation.max_new_tokens:
        raise ConfigError(
            f"data.few_shot: model.max_length={cfg.model.max_length} leaves no room for demonstrations beside "
            f"generation.max_new_tokens={cfg.generation.max_new_tokens}; raise model.max_length"
        )


def check_sources(cfg: RunConfig) -> None:
    """Backbone and data must name something that exists here, checked before anything loads."""
    import os

    from .assets import DATA_ALIASES, MODEL_ALIASES
    from .hf_sources import hub_candidates, is_hub_id
    from .records import DataError

    backbone = cfg.model.backbone
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if backbone not in MODEL_ALIASES and not Path(backbone).is_dir():
        hint = " (HF_HUB_OFFLINE is set, so hub ids cannot be fetched)" if offline else ""
        if offline or "/" not in backbone:
            raise ConfigError(
                f"model.backbone={backbone!r} is neither a built-in alias ({', '.join(MODEL_ALIASES)}) "
                f"nor a local model folder{hint}"
            )
    for key in ("source", "val_source"):
        value = getattr(cfg.data, key)
        if value is None or value in DATA_ALIASES or Path(value).exists():  # a file or a save_to_disk folder
            continue
        if is_hub_id(value):  # fetched (or found in the datasets cache) when the data loads
            try:
                hub_candidates(value)
            except DataError as err:
                raise ConfigError(f"data.{key}: {err}") from None
            continue
        raise ConfigError(
            f"data.{key}={value!r} is neither a built-in dataset ({', '.join(DATA_ALIASES)}) nor an existing file "
            "or folder (hub datasets: hf:NAME[/CONFIG])"
        )


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(to_dict(cfg)), path)


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Rebuild a saved config (the run directory's config.yaml)."""
    values = dict(values)
    trainer = values.pop("trainer", {})
    cfg = _build(RunConfig, values, "")
    cfg.trainer = trainer
    return cfg
