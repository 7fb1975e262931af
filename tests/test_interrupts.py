"""Ctrl-C and SIGTERM in a single-process fit: where the run stops, and that its resume is exact.

Each signal is sent from inside the run at a set moment (in a step, at an epoch's end), so every case is met
on every run; tests/test_training.py also interrupts a whole `fit.py` process, at whatever moment the timing
gives. Not slow (seconds each), so the lowest supported Lightning runs them too.
"""

import os
import signal

import pytest
from conftest import tiny_run_overrides

from moe_prefix.train.checkpointing import load_checkpoint_file
from moe_prefix.train.engine import fit
from moe_prefix.train.module import PrefixTrainingModule
from moe_prefix.train.run_config import load_config

EPOCH_STEPS = 8  # 128 training examples of write_reviews_csv in batches of 16


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("moment", ["in_an_epochs_last_step", "at_an_epochs_end"])
def test_a_signal_at_any_moment_stops_where_the_resume_is_exact(
    tiny_backbone_dir, reviews_csv, tmp_path, monkeypatch, signum, moment
):
    """With Lightning's handlers alone, a SIGTERM at an epoch's end was acted on just after the epoch was
    counted done, and the resume from there skipped the next epoch (val/acc 0.59 against 0.69); Ctrl-C
    stopped inside the step itself."""
    overrides = {"trainer.max_steps": 4 * EPOCH_STEPS, "checkpoint_every_n_steps": 5, "prefix.num_experts": 3}
    cfg = load_config(None, tiny_run_overrides(tiny_backbone_dir, reviews_csv, tmp_path / "run", **overrides))
    want = fit(load_config(None, tiny_run_overrides(tiny_backbone_dir, reviews_csv, tmp_path / "ref", **overrides)))

    sent = []

    def send_once(module, when: bool):
        if when and not sent:
            sent.append(module.global_step)
            os.kill(os.getpid(), signum)

    training_step = PrefixTrainingModule.training_step

    def step_then_signal(self, batch, batch_idx):
        send_once(self, moment == "in_an_epochs_last_step" and self.global_step == 2 * EPOCH_STEPS - 1)
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(PrefixTrainingModule, "training_step", step_then_signal)

    def epoch_end_then_signal(self):
        send_once(self, moment == "at_an_epochs_end" and self.current_epoch == 1)

    monkeypatch.setattr(PrefixTrainingModule, "on_train_epoch_end", epoch_end_then_signal, raising=False)
    with pytest.raises(SystemExit) as stopped:
        fit(cfg)
    assert stopped.value.code == 130 and sent
    saved_at = load_checkpoint_file(tmp_path / "run/checkpoints/interrupted.ckpt")["global_step"]
    # The step under way finishes, and no further one: the epoch's last step, or the next epoch's first.
    assert saved_at == 2 * EPOCH_STEPS + (moment == "at_an_epochs_end")
    monkeypatch.undo()
    got = fit(cfg, resume=True).metrics
    for key in ("val/acc", "val/loss", "val/f1"):
        assert got[key] == pytest.approx(want.metrics[key], abs=1e-6), key
    assert got["steps"] == want.metrics["steps"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back


def test_a_second_ctrl_c_stops_within_the_step(tiny_backbone_dir, reviews_csv, tmp_path, monkeypatch):
    training_step = PrefixTrainingModule.training_step

    def step_interrupted_twice(self, batch, batch_idx):
        if self.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(PrefixTrainingModule, "training_step", step_interrupted_twice)
    cfg = load_config(None, tiny_run_overrides(tiny_backbone_dir, reviews_csv, tmp_path / "run"))
    with pytest.raises(SystemExit) as stopped:
        fit(cfg)
    assert stopped.value.code == 130
    assert load_checkpoint_file(tmp_path / "run/checkpoints/interrupted.ckpt")["global_step"] == 3  # not 4
