"""Experiment trackers (trainer.loggers): config checks, and tiny fits read back from an offline W&B run and an
MLflow file store, alone and as a two-run sweep."""

import importlib.util
import json
import struct
from pathlib import Path

import pytest
from conftest import tiny_run_overrides

from moe_prefix.tools.ablate import plan, run_sweep, sweep_from_grid
from moe_prefix.train import run_config
from moe_prefix.train.engine import fit
from moe_prefix.train.run_config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


# -- config ------------------------------------------------------------------------------------------


def test_loggers_default_to_csv_and_tensorboard_when_installed(monkeypatch):
    want = ["csv", "tensorboard"] if importlib.util.find_spec("tensorboard") else ["csv"]
    assert load_config(None, []).trainer["loggers"] == want
    monkeypatch.setattr(run_config, "_installed", lambda name: False)
    assert load_config(None, []).trainer["loggers"] == ["csv"]  # not asked for: left out, no error


def test_csv_is_always_on_first_and_once():
    assert load_config(None, ["trainer.loggers=[]"]).trainer["loggers"] == ["csv"]
    assert load_config(None, ["trainer.loggers=[tensorboard,csv]"]).trainer["loggers"] == ["csv", "tensorboard"]


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "mlflow"])
def test_a_tracker_not_installed_is_one_line_naming_its_extra(monkeypatch, tracker):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"trainer.loggers=[csv,{tracker}]"])
    assert str(err.value) == (
        f'trainer.loggers: {tracker} is not installed; install its extra: pip install -e ".[{tracker}]"'
    )


def test_the_extras_named_in_errors_exist():
    text = (ROOT / "pyproject.toml").read_text()  # tomllib arrives with Python 3.11; 3.10 is supported
    for tracker in ("tensorboard", "wandb", "mlflow"):
        assert f'\n{tracker} = ["{tracker}>=' in text, tracker


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.loggers=[comet]", "unknown tracker 'comet'; choose from csv, tensorboard, wandb, mlflow"),
        ("trainer.loggers=3", "must be a list such as [csv,wandb]"),
        ("trainer.logger=false", "choose trackers with trainer.loggers"),
        ("tracking.projekt=x", "did you mean tracking.project"),
    ],
)
def test_bad_tracker_settings_fail_before_any_model_loads(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_a_resumed_config_naming_a_missing_tracker_fails_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(run_config, "_installed", lambda name: True)  # written where wandb is installed ...
    cfg = load_config(None, ["trainer.loggers=[wandb]", f"run_dir={tmp_path / 'run'}"])
    monkeypatch.setattr(run_config, "_installed", lambda name: False)  # ... and resumed on a machine without it
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[wandb\]"'):
        fit(cfg)
    assert not (tmp_path / "run").exists()


def test_sweep_runs_carry_the_sweep_name_as_group_and_arm_and_seed_as_tags(tmp_path):
    sweep = sweep_from_grid(None, ["prefix.top_k=1,2"], [0, 3], ["tracking.project=mine"])
    runs = plan(sweep, tmp_path / "topk_sweep")
    assert len(runs) == 4
    for run in runs:
        cfg = load_config(None, run.overrides)
        assert cfg.tracking.group == "topk_sweep" and cfg.tracking.project == "mine"
        assert cfg.tracking.tags == {"arm": run.arm, "seed": run.seed}
    # A group given by the sweep itself wins over the folder's name.
    sweep.overrides.append("tracking.group=mine")
    assert load_config(None, plan(sweep, tmp_path / "x")[0].overrides).tracking.group == "mine"


# -- reading back what the trackers stored -------------------------------------------------------------


def wandb_records(run_file: Path) -> list:
    """The records of a W&B run file (`run-ID.wandb`): a LevelDB-style log of protobuf `Record`s.

    Layout: a 7-byte file header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a 7-byte
    header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); a block tail under 7 bytes is padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding up to the block's end
            pos += (block - pos % block) % block
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B stores `a/b` keys as the nested key [a, b]


def wandb_run(run_dir: Path) -> dict:
    """Run header, config, and history rows of the one offline W&B run under run_dir."""
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = {"config": {}, "history": []}
    for r in wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
        elif kind == "config":
            out["config"].update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in r.history.item})
    return out


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch):
    """W&B offline under the run directory, MLflow in a file store under tmp_path; returns the MLflow URI."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants opting in to the file store
    return f"file:{tmp_path / 'mlruns'}"


def _loss_steps(rows: list[dict], key: str = "train/loss") -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key) not in (None, "")}


def _csv_log(run_dir: Path) -> list[dict]:
    import csv

    return list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))


@pytest.mark.slow
def test_wandb_offline_fit_logs_config_steps_and_final_metrics(
    tiny_backbone_dir, reviews_csv, tmp_path, offline_trackers
):
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_backbone_dir, reviews_csv, run_dir, **{"trainer.loggers": "[wandb]"})
    cfg = load_config(None, [*overrides, "name=tiny", "tracking.project=tests", "tracking.tags.arm=a"])
    metrics = fit(cfg).metrics
    import wandb

    wandb.teardown()  # the W&B service writes the offline run file behind the run's finish(); this waits for it
    run = wandb_run(run_dir)
    assert run["run"].display_name == "tiny-seed0" and run["run"].project == "tests"
    assert list(run["run"].tags) == ["arm=a"]
    assert run["config"]["prefix"]["num_experts"] == 2 and run["config"]["optim"]["lr"] == 0.05
    assert run["config"]["trainer"]["loggers"] == ["csv", "wandb"]
    logged = {int(h["trainer/global_step"]): h["train/loss"] for h in run["history"] if "train/loss" in h}
    csv_loss = _loss_steps(_csv_log(run_dir))
    assert len(logged) == 8 and set(logged) == set(csv_loss)
    assert logged == pytest.approx(csv_loss, rel=1e-6)  # the same per-step loss the CSV log holds
    final = run["history"][-1]
    assert final["trainer/global_step"] == 8
    for key in ("val/acc", "val/loss", "val/acc/cinema", "trainable_params", "train_time_s"):
        assert final[key] == pytest.approx(metrics[key]), key
    assert json.loads((run_dir / "trackers.json").read_text()) == {"wandb": run["run"].run_id}


def _mlflow_client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


@pytest.mark.slow
def test_mlflow_file_store_fit_logs_config_steps_and_final_metrics_and_resumes_the_same_run(
    tiny_backbone_dir, reviews_csv, tmp_path, offline_trackers
):
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_backbone_dir, reviews_csv, run_dir, **{"trainer.loggers": "[mlflow]"})
    cfg = load_config(None, [*overrides, "name=tiny", f"tracking.mlflow_uri={offline_trackers}", "tracking.tags.k=v"])
    metrics = fit(cfg).metrics
    client = _mlflow_client(offline_trackers)
    (experiment,) = [e for e in client.search_experiments() if e.name == "moe_prefix"]  # the project, no group
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny-seed0" and run.info.status == "FINISHED"
    assert run.data.tags["k"] == "v"
    assert run.data.params["prefix/num_experts"] == "2" and run.data.params["optim/lr"] == "0.05"
    # A file store names metrics val.acc, not val/acc (trackers._MLFlowLogger says why).
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train.loss")}
    assert history == pytest.approx(_loss_steps(_csv_log(run_dir)), rel=1e-6) and len(history) == 8
    for key in ("val/acc", "val/loss", "val/acc/cinema", "trainable_params", "train_time_s"):
        assert run.data.metrics[key.replace("/", ".")] == pytest.approx(metrics[key]), key
    assert json.loads((run_dir / "trackers.json").read_text()) == {"mlflow": run.info.run_id}
    fit(cfg, resume=True)  # continues the same tracker run: no second one
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run.info.run_id]


@pytest.mark.slow
def test_a_two_run_sweep_lands_in_one_wandb_group_and_one_mlflow_experiment(
    tiny_backbone_dir, reviews_csv, tmp_path, offline_trackers, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the runs are child processes: this checkout's package
    budget = [o for o in tiny_run_overrides(tiny_backbone_dir, reviews_csv, "unused") if not o.startswith("run_dir")]
    budget += ["trainer.loggers=[wandb,mlflow]", f"tracking.mlflow_uri={offline_trackers}", "trainer.max_steps=4"]
    sweep = sweep_from_grid(None, ["prefix.top_k=1"], [0, 1], budget)
    run_sweep(sweep, tmp_path / "my_sweep")
    runs = plan(sweep, tmp_path / "my_sweep")
    assert all(r.done for r in runs), [(r.run_dir / "fit.log").read_text() for r in runs if not r.done]
    headers = [wandb_run(r.run_dir)["run"] for r in runs]
    assert [h.run_group for h in headers] == ["my_sweep", "my_sweep"]
    assert [sorted(h.tags) for h in headers] == [["arm=prefix.top_k=1", f"seed={s}"] for s in (0, 1)]
    client = _mlflow_client(offline_trackers)
    (experiment,) = [e for e in client.search_experiments() if e.name == "my_sweep"]
    found = client.search_runs([experiment.experiment_id])
    assert sorted((r.data.tags["arm"], r.data.tags["seed"]) for r in found) == [
        ("prefix.top_k=1", "0"),
        ("prefix.top_k=1", "1"),
    ]
