"""moe_prefix: prefix tuning with a mixture of prefix experts, for any Hugging Face transformer."""

from .config import BackboneDims, PrefixConfig
from .mixture import MixtureRouting, PrefixMixture, attach
from .router import CollapseReport, RouterOutput, detect_collapse, load_balance_loss, router_z_loss

__all__ = [
    "BackboneDims",
    "CollapseReport",
    "MixtureRouting",
    "PrefixConfig",
    "PrefixMixture",
    "RouterOutput",
    "attach",
    "detect_collapse",
    "load_balance_loss",
    "router_z_loss",
]
