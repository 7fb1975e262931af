"""Configuration layering and checking: defaults <- YAML <- command line, errors that name the key."""

import pytest

from moe_prefix.train.run_config import ConfigError, load_config


def test_layers_merge_in_order(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("prefix:\n  num_experts: 8\n  top_k: 4\ntrainer:\n  max_steps: 100\n")
    cfg = load_config(path, ["prefix.top_k=2", "optim.lr=0.01"])
    assert (cfg.prefix.num_experts, cfg.prefix.top_k, cfg.optim.lr) == (8, 2, 0.01)
    assert cfg.trainer["max_steps"] == 100 and cfg.trainer["max_epochs"] == 1  # default kept
    assert cfg.name == "exp" and cfg.prefix.prefix_len == 16


def test_repo_configs_load():
    for name in ("moe4", "prefix1"):
        load_config(f"configs/{name}.yaml")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["prefix.topk=2"], "did you mean prefix.top_k"),
        (["prefx.top_k=2"], "did you mean prefix"),
        (["prefix.num_experts=four"], "prefix.num_experts='four' has the wrong type"),
        (["prefix.top_k=5"], "prefix.top_k=5 must lie in 1..num_experts=4"),
        (["prefix.prefix_len=0"], "prefix.prefix_len must be >= 1"),
        (["prefix.combine=stack"], "prefix.combine='stack' is not one of blend, concat"),
        (["trainer.max_stpes=3"], "did you mean trainer.max_steps"),
        (["data.val_fraction=1.5"], "data.val_fraction"),
        (["model.method=adapter"], "model.method='adapter' is not one of"),
        (["top_k"], "must look like key=value"),
        (["ddp_timeout_s=0"], "ddp_timeout_s=0.0 must be > 0"),
    ],
)
def test_bad_config_fails_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "overrides,start_method,timeout_s",
    [
        (["trainer.strategy=ddp", "trainer.devices=2"], "popen", 300),
        (["trainer.strategy=ddp_spawn", "trainer.devices=2", "ddp_timeout_s=20"], "spawn", 20),
        (["trainer.strategy=auto"], None, None),
        (["trainer.strategy=ddp", "trainer.accelerator=gpu"], None, None),  # NCCL keeps Lightning's own
    ],
)
def test_cpu_ddp_gets_the_configured_collective_timeout(overrides, start_method, timeout_s):
    """Lightning's default is 30 minutes: a hung gloo peer would hold the job that long."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from moe_prefix.train.engine import _strategy

    given = _strategy(load_config(None, overrides))
    if start_method is None:
        assert given == {}
        return
    strategy = given["strategy"]
    assert type(strategy) is DDPStrategy and strategy._start_method == start_method
    assert strategy._timeout == timedelta(seconds=timeout_s)
