"""fit(cfg) end to end on a tiny backbone and a generated CSV: run directory, resume, custom columns."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_run_overrides, write_reviews_csv
from safetensors import safe_open

from moe_prefix.train.checkpointing import load_checkpoint_file
from moe_prefix.train.engine import _latest_checkpoint, fit
from moe_prefix.train.run_config import load_config

pytestmark = pytest.mark.slow  # every test here is a whole fit

ROOT = Path(__file__).resolve().parents[1]


def test_fit_writes_the_run_directory(tiny_backbone_dir, reviews_csv, tmp_path):
    cfg = load_config(None, tiny_run_overrides(tiny_backbone_dir, reviews_csv, tmp_path / "run"))
    result = fit(cfg)
    run = result.run_dir
    for name in ("config.yaml", "metrics.json", "adapter.safetensors", "routing.csv", "logs/metrics.csv"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/acc", "val/loss", "val/f1", "val/acc/cinema", "val/acc/kitchen"} <= set(metrics)
    assert metrics["steps"] == 8
    with safe_open(str(run / "adapter.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys and not any(k.startswith("body.backbone.") for k in keys), keys
    assert keys == {"body.bank.kv", "body.router.proj.weight", "body.router.proj.bias", "head.weight", "head.bias"}
    rows = (run / "routing.csv").read_text().strip().splitlines()
    header = "id,group,label,label_name,prediction,prediction_name,loss,input_len,prefix_len,experts,w0,w1"
    assert rows[0] == header
    assert len(rows) - 1 == 32  # 20 % of 160 examples
    assert {row.split(",")[3] for row in rows[1:]} == {"neg", "pos"}
    assert json.loads((run / "labels.json").read_text()) == {"label_column": "stars", "classes": ["neg", "pos"]}


def test_fit_learns_the_generated_task(tiny_backbone_dir, reviews_csv, tmp_path):
    cfg = load_config(
        None,
        tiny_run_overrides(tiny_backbone_dir, reviews_csv, tmp_path / "run", **{"trainer.max_steps": 100}),
    )
    # Majority class is 17/32 = 0.53; a random 2-layer backbone of width 32 limits what any adapter reaches.
    assert fit(cfg).metrics["val/acc"] >= 0.7


def _fit_process(args, **kwargs):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }  # tiny models: one thread
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts/fit.py"), *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


INTERRUPTED = {"trainer.max_steps": 200, "checkpoint_every_n_steps": 10, "prefix.num_experts": 3}


@pytest.fixture(scope="module")
def uninterrupted(tiny_backbone_dir, tmp_path_factory):
    """The metrics of the run that the interrupted ones must reproduce."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    data = write_reviews_csv(folder / "reviews.csv")
    reference = _fit_process(tiny_run_overrides(tiny_backbone_dir, data, folder / "ref", **INTERRUPTED))
    assert reference.wait(timeout=300) == 0, reference.stdout.read()
    return data, json.loads((folder / "ref" / "metrics.json").read_text())


def _interrupt_mid_run(backbone, data, run, signum):
    """Start a run and send signum mid-epoch, some time after a few checkpoints (epochs are 8 steps long)."""
    proc = _fit_process(tiny_run_overrides(backbone, data, run, **INTERRUPTED))
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step=50.ckpt").exists() and time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be interrupted:\n" + proc.stdout.read())
        time.sleep(0.05)
    proc.send_signal(signum)
    out = proc.communicate(timeout=300)[0]
    assert not (run / "metrics.json").exists(), "the run finished before the signal"
    return proc.returncode, out


def _trained_seconds_saved(run) -> float:
    """The training seconds that the checkpoint a resume starts from holds (0 without any)."""
    ckpt = _latest_checkpoint(run / "checkpoints")
    states = load_checkpoint_file(ckpt)["callbacks"]
    return next((state["seconds"] for key, state in states.items() if "_Timer" in str(key)), 0.0)


def _resume_matches(run, want):
    saved = _trained_seconds_saved(run)
    assert saved > 0, "the checkpoint keeps no training time"
    resumed = _fit_process(["--resume", str(run)])
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert out.strip().splitlines()[-1].split()[-1] == str(run)
    got = json.loads((run / "metrics.json").read_text())
    for key in ("val/acc", "val/loss", "val/f1"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert got["steps"] == want["steps"] == 200
    assert got["train_time_s"] > saved  # the whole training, not only the attempt after the resume
    # The training log covers the whole run, before and after the interruption.
    steps = [int(line.split(",")[1]) for line in (run / "logs/metrics.csv").read_text().splitlines()[1:]]
    assert min(steps) < 20 and max(steps) >= 190


def test_killed_run_resumes_to_the_same_metrics(tiny_backbone_dir, uninterrupted, tmp_path):
    data, want = uninterrupted
    run = tmp_path / "killed"
    code, _ = _interrupt_mid_run(tiny_backbone_dir, data, run, signal.SIGKILL)
    assert code == -signal.SIGKILL
    _resume_matches(run, want)


def test_terminated_run_saves_a_checkpoint_and_resumes_to_the_same_metrics(tiny_backbone_dir, uninterrupted, tmp_path):
    """SIGTERM, what a cluster scheduler (SLURM) sends before it preempts or times out a job: the run stops
    after the current step and a checkpoint is saved there, so the resumed run loses nothing."""
    data, want = uninterrupted
    run = tmp_path / "terminated"
    code, out = _interrupt_mid_run(tiny_backbone_dir, data, run, signal.SIGTERM)
    assert code == 130, out
    assert f"interrupted; checkpoint saved. Continue with --resume {run}" in out
    assert (run / "checkpoints" / "interrupted.ckpt").is_file()
    _resume_matches(run, want)


def test_fit_resumed_after_the_end_writes_strict_json(tiny_backbone_dir, reviews_csv, tmp_path):
    """Resuming a finished run trains nothing; its training time used to be written as NaN (not JSON)."""
    cfg = load_config(None, tiny_run_overrides(tiny_backbone_dir, reviews_csv, tmp_path / "run"))
    first = fit(cfg).metrics
    again = fit(cfg, resume=True)
    text = (again.run_dir / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda name: pytest.fail(f"metrics.json holds {name}"))
    assert "train_time_s" in first and "train_time_s" not in metrics  # left out, not NaN
    assert metrics["val/acc"] == first["val/acc"] and metrics["steps"] == first["steps"]


def test_ddp_two_processes_equal_one_process_on_the_same_global_batch(tiny_backbone_dir, reviews_csv, tmp_path):
    """gloo on CPU: 2 x batch 8 gives the weights of 1 x batch 16 (load balance over the global batch)."""
    from safetensors.torch import load_file

    extra = {
        "prefix.num_experts": 3,
        "prefix.top_k": 2,
        "prefix.router_noise": 0,
        # Balanced routing (a default since issue 24) assigns slots within each process's batch, so only without
        # it do two processes of 8 route exactly as one of 16.
        "prefix.balanced_routing": False,
        "trainer.max_steps": 5,
        "optim.schedule": "constant",
    }
    single = _fit_process(
        tiny_run_overrides(tiny_backbone_dir, reviews_csv, tmp_path / "one", **extra, **{"data.batch_size": 16})
    )
    assert single.wait(timeout=300) == 0, single.stdout.read()
    ddp = _fit_process(
        tiny_run_overrides(
            tiny_backbone_dir,
            reviews_csv,
            tmp_path / "two",
            **extra,
            **{"data.batch_size": 8, "trainer.strategy": "ddp", "trainer.devices": 2},
        )
    )
    out = ddp.communicate(timeout=300)[0]
    assert ddp.returncode == 0, out
    one, two = (
        load_file(str(tmp_path / "one/adapter.safetensors")),
        load_file(str(tmp_path / "two/adapter.safetensors")),
    )
    for key in one:
        assert (one[key] - two[key]).abs().max() <= 1e-4, key
    m1 = json.loads((tmp_path / "one/metrics.json").read_text())
    m2 = json.loads((tmp_path / "two/metrics.json").read_text())
    assert m1["val/loss"] == pytest.approx(m2["val/loss"], abs=1e-5)


def test_ddp_run_that_loses_its_second_process_stops_in_one_line_and_resumes(tiny_backbone_dir, tmp_path):
    """gloo on CPU, 2 processes; process 1 is killed mid-run: process 0 ends soon with one line naming the
    lost process, the intact checkpoint and the --resume command; the resumed run ends like an undisturbed one."""
    import psutil

    data = write_reviews_csv(tmp_path / "reviews.csv")
    extra = {"trainer.max_steps": 60, "checkpoint_every_n_steps": 10, "prefix.num_experts": 3}
    ddp = {"trainer.strategy": "ddp", "trainer.devices": 2, "data.batch_size": 8}
    reference = _fit_process(tiny_run_overrides(tiny_backbone_dir, data, tmp_path / "ref", **extra, **ddp))
    out = reference.communicate(timeout=300)[0]
    assert reference.returncode == 0, out
    want = json.loads((tmp_path / "ref" / "metrics.json").read_text())

    run = tmp_path / "run"
    proc = _fit_process(tiny_run_overrides(tiny_backbone_dir, data, run, **extra, **ddp))
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step=20.ckpt").exists() and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stdout.read()
        time.sleep(0.02)
    (second,) = psutil.Process(proc.pid).children()  # Lightning starts process 1 as a child of process 0
    second.kill()
    killed_at = time.time()
    out = proc.communicate(timeout=120)[0]
    took = time.time() - killed_at
    assert proc.returncode == 2, out
    assert took < 30, f"process 0 took {took:.1f} s to stop"
    assert "Traceback" not in out and not (run / "metrics.json").exists()
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert re.fullmatch(
        r"error: run stopped: data-parallel process 1 of 2 stopped \(its connection closed: killed or crashed\); "
        rf"the last good checkpoint, {re.escape(str(run))}/checkpoints/last\.ckpt \(step \d+\), is intact; "
        rf"continue with: moe-prefix fit --resume {re.escape(str(run))}",
        errors[0],
    ), errors[0]
    assert not (run / "checkpoints" / "interrupted.ckpt").exists()  # nothing saved mid-step
    print(f"process 0 stopped {took:.1f} s after process 1 was killed")  # shown with -s

    resumed = _fit_process(["--resume", str(run)])
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    got = json.loads((run / "metrics.json").read_text())
    for key in ("val/acc", "val/loss", "val/f1"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert got["steps"] == want["steps"] == 60
