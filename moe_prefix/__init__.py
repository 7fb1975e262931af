"""moe_prefix: prefix tuning with a mixture of prefix experts, for any Hugging Face transformer.

The names below load on first use (PEP 562), so that `moe-prefix --help`, argument errors and config checks
run without importing torch and transformers.
"""

from importlib import import_module

_EXPORTS = {
    "BackboneDims": "config",
    "PrefixConfig": "config",
    "MixtureRouting": "mixture",
    "PrefixMixture": "mixture",
    "attach": "mixture",
    "CollapseReport": "router",
    "RouterOutput": "router",
    "detect_collapse": "router",
    "load_balance_loss": "router",
    "router_z_loss": "router",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe_prefix' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
