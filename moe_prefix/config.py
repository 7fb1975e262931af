"""Configuration of the prefix mixture, and the sizes it reads off a backbone.

`PrefixConfig` holds only choices a researcher makes. Sizes the backbone already knows (layers,
key/value heads, head size) are read from its config by `BackboneDims`, never typed by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROUTINGS = ("soft", "topk")
COMBINES = ("blend", "concat")
ROUTER_INPUTS = ("embeddings", "hidden", "group")
LENGTH_MODES = ("fixed", "expert", "learned")
INITS = ("random", "tokens")
PREFIX_MODES = ("softmax", "decoupled")
ROUTER_INITS = ("random", "kmeans", "by_group")
EXPERT_INITS = ("independent", "upcycle")
ATTENTION_PATHS = ("auto", "split", "joint")
SITES = ("encoder", "decoder", "cross")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"prefix.{name}={value!r} is not one of {', '.join(choices)}")


@dataclass
class PrefixConfig:
    """What the mixture of prefix experts looks like. Validated on construction."""

    num_experts: int = 4  # E prefix banks
    prefix_len: int = 16  # P positions per bank (the maximum when lengths are dynamic)
    shared_len: int = 0  # S positions beside the routed banks that every input attends to with weight one, in
    # both combine modes (DeepSeekMoE's shared experts; SMoP's central prompt): what all sources share lives
    # there, so the routed banks need not each relearn it. 0: no shared part. Lengths never cut it
    top_k: int | None = 2  # banks used per input with routing="topk"; None means all of them
    routing: str = "topk"  # soft: dense softmax over all banks; topk: sparse, renormalised over the top k
    combine: str = "blend"  # blend: weighted sum of keys/values (P positions); concat: banks side by side (k·P)
    temperature: float = 1.0  # router softmax temperature
    router_noise: float = 1.0  # std of Gaussian noise on router logits in training (topk only; Shazeer 2017)
    # The defaults below are the recipe that kept every expert alive in the 8-seed studies (docs/router_recipes.md):
    router_init: str | None = None  # random: N(0, 0.02) weights; kmeans: nearest-centroid router from k-means with E
    # clusters over the router features of training inputs, before the first step (it keeps learning; fit() runs it,
    # the Python API through mixture.init_router_kmeans(batches)); by_group: oracle routing, group g to expert g, fixed
    # (router_input=group, top_k=1, balanced_routing=false); None: kmeans, or random where k-means has nothing to
    # cluster (router_input=group, or one expert)
    balanced_routing: bool = True  # training only: choose each batch's top-k by a Sinkhorn-balanced assignment,
    # so every expert gets b*k/E slots of every batch and none starves (BASE layers, Lewis et al. 2021)
    balance_free_choices: bool = True  # with balanced_routing: the Switch loss counts the router's own top-k
    # (what evaluation routes by) rather than the balanced assignment's, whose uniform counts leave it no gradient;
    # without balanced_routing the loss counts those choices anyway
    router_input: str = "embeddings"  # embeddings: masked mean of frozen input embeddings (free)
    # hidden: masked mean of a frozen pre-pass up to router_layer; group: oracle group id (ablations)
    router_layer: int = 2  # number of backbone layers the hidden pre-pass runs (router_input="hidden")
    num_groups: int | None = None  # size of the group vocabulary (router_input="group")
    balance_coef: float = 0.1  # weight of the Switch load-balancing loss (Fedus et al. 2021)
    z_coef: float = 0.001  # weight of the router z-loss (Zoph et al. 2022)
    length: str = "fixed"  # fixed: every input gets P; expert: expert_lengths; learned: a length head
    expert_lengths: tuple[int, ...] | None = None  # one fixed length per bank (length="expert")
    min_len: int = 1  # smallest length the learned head can choose
    length_tau: float = 1.0  # width of the soft mask sigmoid((l - i - 0.5) / tau) used in training
    length_cost: float = 0.01  # weight of mean(l)/P added to the loss (length="learned")
    reparam: bool = False  # train banks through an MLP over small embeddings (Li & Liang 2021); fold() for export
    reparam_dim: int = 64  # width of the per-position embedding fed to the MLP
    reparam_hidden: int = 256  # hidden width of the reparameterisation MLP
    init: str = "random"  # random: N(0, init_std); tokens: keys/values of real tokens (init_from_text)
    init_std: float = 0.02
    expert_init: str = "independent"  # independent: every bank drawn by `init`; upcycle: every bank starts as the
    # one-expert prefix of a finished run (model.init_from) plus seeded noise (sparse upcycling, Komatsuzaki et
    # al. 2023); its shared part, if any, is copied as it is
    upcycle_noise: float = 0.01  # std of that noise, relative to the std of the source prefix
    expert_rank: int = 0  # r > 0: factorised experts, expert e = base ⊙ (1 + U_e V_e): one base prefix that every
    # input trains, times a rank-r per-expert factor that starts at zero (MPT, Wang et al. 2023); 0: independent banks
    prefix_mode: str = "softmax"  # softmax: prefix positions join the attention softmax (Li & Liang);
    # decoupled: each expert adds a separate term to the attention output (Prefix-Tuning+ style)
    attention_path: str = "auto"  # split: tokens on the fused kernel, prefix beside, merged by log-sum-exp (an
    # error where it cannot run); joint: one softmax over [prefix, tokens]; auto: split on CUDA where it applies
    sites: tuple[str, ...] = SITES  # encoder-decoder backbones only: where prefixes go, among encoder
    # self-attention, decoder self-attention and cross-attention (all three, as Li & Liang did on BART)
    train_modules: tuple[str, ...] = field(default_factory=tuple)  # backbone parameter-name prefixes that train
    # (a freshly initialised task head such as "classifier" or "score")

    def __post_init__(self) -> None:
        _choice("routing", self.routing, ROUTINGS)
        _choice("combine", self.combine, COMBINES)
        _choice("router_input", self.router_input, ROUTER_INPUTS)
        _choice("length", self.length, LENGTH_MODES)
        _choice("init", self.init, INITS)
        _choice("prefix_mode", self.prefix_mode, PREFIX_MODES)
        if self.router_init is None:
            self.router_init = "random" if self.router_input == "group" or self.num_experts == 1 else "kmeans"
        _choice("router_init", self.router_init, ROUTER_INITS)
        _choice("attention_path", self.attention_path, ATTENTION_PATHS)
        _choice("expert_init", self.expert_init, EXPERT_INITS)
        if self.num_experts < 1:
            raise ValueError(f"prefix.num_experts must be >= 1, got {self.num_experts}")
        if self.prefix_len < 1:
            raise ValueError(f"prefix.prefix_len must be >= 1, got {self.prefix_len}")
        if self.shared_len < 0:
            raise ValueError(f"prefix.shared_len must be >= 0, got {self.shared_len}")
        if self.shared_len and self.prefix_mode == "decoupled":
            raise ValueError("prefix.shared_len applies to prefix_mode=softmax: decoupled experts have no shared part")
        if self.expert_rank < 0:
            raise ValueError(f"prefix.expert_rank must be >= 0, got {self.expert_rank}")
        if self.expert_rank:
            for clash, present in (
                ("reparam=true", self.reparam),
                ("init=tokens", self.init == "tokens"),
                ("expert_init=upcycle", self.expert_init == "upcycle"),
            ):
                if present:
                    raise ValueError(
                        f"prefix.expert_rank={self.expert_rank} (factorised experts) cannot be combined with prefix."
                        f"{clash}: the factors are their own parameterisation; set expert_rank=0 or drop {clash}"
                    )
        if self.upcycle_noise < 0:
            raise ValueError(f"prefix.upcycle_noise must be >= 0, got {self.upcycle_noise}")
        if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"prefix.top_k={self.top_k} must lie in 1..num_experts={self.num_experts} (or null for all)"
            )
        if self.temperature <= 0:
            raise ValueError(f"prefix.temperature must be > 0, got {self.temperature}")
        if self.router_input == "hidden" and self.router_layer < 1:
            raise ValueError(f"prefix.router_layer must be >= 1, got {self.router_layer}")
        if self.length == "expert":
            lengths = self.expert_lengths
            if lengths is None or len(lengths) != self.num_experts:
                raise ValueError(
                    f"prefix.length=expert needs prefix.expert_lengths with one entry per expert "
                    f"({self.num_experts}), got {lengths}"
                )
            if any(not 0 <= n <= self.prefix_len for n in lengths):
                raise ValueError(f"prefix.expert_lengths must lie in 0..prefix_len={self.prefix_len}, got {lengths}")
            self.expert_lengths = tuple(int(n) for n in lengths)
        if not 0 <= self.min_len <= self.prefix_len:
            raise ValueError(f"prefix.min_len must lie in 0..prefix_len={self.prefix_len}, got {self.min_len}")
        if self.length_tau <= 0:
            raise ValueError(f"prefix.length_tau must be > 0, got {self.length_tau}")
        if self.init == "tokens" and self.reparam:
            raise ValueError("prefix.init=tokens sets bank tensors directly; it cannot be combined with reparam=true")
        if self.router_init == "kmeans" and self.router_input == "group":
            raise ValueError(
                "prefix.router_init=kmeans clusters input features; with router_input=group use random or by_group"
            )
        if self.router_init == "by_group":
            # A learned router fed the group id is not an oracle: from a random start it can send two groups to one
            # expert and leave another idle. by_group fixes the map; anything that moves inputs off it is refused.
            wrong = [
                f"prefix.{name}={value}"
                for name, value, wanted in (
                    ("router_input", self.router_input, "group"),
                    ("routing", self.routing, "topk"),
                    ("top_k", self.top_k, 1),
                    ("balanced_routing", self.balanced_routing, False),
                )
                if value != wanted
            ]
            if wrong:
                raise ValueError(
                    "prefix.router_init=by_group sends each group to its own expert and needs prefix.router_input=group"
                    f" prefix.routing=topk prefix.top_k=1 prefix.balanced_routing=false; got {' '.join(wrong)}"
                )
        if self.prefix_mode == "decoupled" and self.length != "fixed":
            raise ValueError("prefix.prefix_mode=decoupled supports only prefix.length=fixed")
        self.train_modules = tuple(self.train_modules)
        sites = tuple(self.sites) if isinstance(self.sites, (list, tuple)) else (self.sites,)
        unknown = [site for site in sites if site not in SITES]
        if unknown or not sites or len(set(sites)) != len(sites):
            raise ValueError(f"prefix.sites={list(sites)} must be distinct entries of {', '.join(SITES)}, at least one")
        self.sites = tuple(site for site in SITES if site in sites)

    @property
    def k(self) -> int:
        """Banks used per input."""
        if self.routing == "soft" or self.top_k is None:
            return self.num_experts
        return self.top_k


@dataclass(frozen=True)
class BackboneDims:
    """Attention geometry of a backbone, read from its Hugging Face config."""

    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # prefix heads: grouped-query attention shares each key/value head across query heads
    head_dim: int
    hidden_size: int

    @classmethod
    def from_config(cls, config) -> BackboneDims:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(text.num_hidden_layers, heads, kv_heads, head_dim, text.hidden_size)
