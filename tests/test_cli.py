"""The `moe-prefix` command: its subcommands, and bad input as one line naming the problem, exit code 2,
never a traceback."""

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

# Imported at collection, before any test captures output: Lightning's log handler keeps the stream it first
# sees, and a test's captured stream is closed after it ("Logging error" in the tests that follow).
import lightning.pytorch  # noqa: F401
import pytest
from conftest import poison_loss_from_step, tiny_run_overrides, write_reviews_csv

from moe_prefix.tools.cli import COMMANDS, main
from moe_prefix.train.checkpointing import load_checkpoint_file

ROOT = Path(__file__).resolve().parents[1]


def run_fit(argv, capsys):
    code = main(["fit", *argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_clean_failure(code, output, message):
    assert code == 2, output
    assert message in output, output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--config", "configs/nope.yaml"], "config file not found: configs/nope.yaml"),
        (["--config", "configs/moe4.yaml", "prefix.topk=2"], "did you mean prefix.top_k"),
        (["prefix.num_experts=2", "prefix.top_k=3"], "prefix.top_k=3 must lie in 1..num_experts=2"),
        (["prefix.prefix_len=-4"], "prefix.prefix_len must be >= 1"),
        (["model.backbone=no-such-model"], "model.backbone='no-such-model' is neither a built-in alias"),
        (["data.source=missing.csv"], "data.source='missing.csv' is neither a built-in dataset"),
        (["data.source=hf:a//b"], "data.source: 'hf:a//b' is not a hub dataset id: use hf:NAME, hf:NAME/CONFIG"),
    ],
)
def test_config_errors(argv, message, capsys):
    assert_clean_failure(*run_fit(argv, capsys), message)


def test_bench_overrides_without_a_generation_config_are_refused(capsys):
    code = main(["bench", "data.batch_size=4"])
    captured = capsys.readouterr()
    assert_clean_failure(code, captured.out + captured.err, "config overrides (data.batch_size=4) apply with --gem4")


def test_config_error_from_a_real_process():
    """The same standard when run as a program (what a user sees in the terminal)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "scripts/fit.py", "--config", "configs/moe4.yaml", "prefix.combine=stack"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: prefix.combine='stack' is not one of blend, concat"
    assert "Traceback" not in proc.stderr + proc.stdout


def _csv(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "content,extra,message",
    [
        (None, {}, "is neither a built-in dataset (vader_domains, e2e_nlg"),
        (None, {}, "nor an existing file or folder (hub datasets: hf:NAME[/CONFIG])"),
        ("", {}, "data file is empty"),
        (
            "review,rating,site\ngood movie,pos,cinema\n",
            {},
            "no column 'stars' (columns present: review, rating, site)",
        ),
        ("review,stars,site\ngood movie,,cinema\nbad plot,neg,cinema\n", {}, "stars"),
    ],
)
def test_data_errors(tiny_backbone_dir, tmp_path, capsys, content, extra, message):
    path = tmp_path / "data.csv"
    if content is not None:
        _csv(path, content)
    argv = tiny_run_overrides(tiny_backbone_dir, path, tmp_path / "run", **extra)
    assert_clean_failure(*run_fit(argv, capsys), message)


@pytest.mark.parametrize(
    "name,content,message",
    [
        (
            "cols.csv",
            "review,rating,site\ngood movie,pos,cinema\n",
            "no column 'stars' (columns present: review, rating",
        ),
        (
            "one.csv",
            "review,stars,site\ngood movie,pos,cinema\ngreat plot,pos,cinema\nfine food,pos,kitchen\n",
            "the training data has a single class ('pos') in column 'stars'; classification needs at least two",
        ),
        (
            "obj.jsonl",
            '{"review": "good movie", "stars": "pos", "site": "cinema"}\n'
            '{"review": {"a": 1}, "stars": "neg", "site": "cinema"}\n',
            "obj.jsonl:2: text column 'review' holds a value of type dict ({'a': 1}); expected a string",
        ),
        (
            "grp.jsonl",
            '{"review": "good movie", "stars": "pos", "site": ["cinema"]}\n',
            "grp.jsonl:1: group column 'site' holds a value of type list (['cinema']); expected a string or an integer",
        ),
    ],
)
def test_bad_data_fails_in_one_line_and_writes_nothing(
    tiny_backbone_dir, tmp_path, capsys, monkeypatch, name, content, message
):
    """A single class used to end in a torchmetrics traceback and an object text was trained on; every failed
    fit, even on an error it always caught (a missing column), left runs/<name>-<time>/config.yaml behind."""
    data = _csv(tmp_path / name, content)
    monkeypatch.chdir(tmp_path)
    argv = [o for o in tiny_run_overrides(tiny_backbone_dir, data, "unused") if not o.startswith("run_dir=")]
    code, output = run_fit(argv, capsys)
    assert_clean_failure(code, output, message)
    assert len(output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_hub_id_offline_is_a_one_line_error(tiny_backbone_dir, tmp_path, capsys):
    argv = tiny_run_overrides(tiny_backbone_dir, "hf:glue/sst2", tmp_path / "run")
    code, output = run_fit(argv, capsys)
    assert_clean_failure(
        code, output, "error: hf:glue/sst2: the Hugging Face hub is unreachable (HF_HUB_OFFLINE is set)"
    )
    assert len(output.strip().splitlines()) == 1 and "data.source=FOLDER" in output
    assert not (tmp_path / "run").exists()


def test_validation_label_unseen_in_training(tiny_backbone_dir, tmp_path, capsys):
    train = write_reviews_csv(tmp_path / "train.csv", n=40)
    val = _csv(tmp_path / "val.csv", "review,stars,site\ngood movie,meh,cinema\n")
    argv = tiny_run_overrides(tiny_backbone_dir, train, tmp_path / "run", **{"data.val_source": val})
    assert_clean_failure(*run_fit(argv, capsys), "validation labels never seen in training: ['meh']")


def test_long_texts_and_bad_bytes_warn_and_train(tiny_backbone_dir, tmp_path, capsys):
    path = write_reviews_csv(tmp_path / "reviews.csv", n=60)
    with open(path, "ab") as f:
        f.write(b"good movie \xff\xfe plot " + b"screen " * 80 + b",pos,cinema\n")
    argv = tiny_run_overrides(tiny_backbone_dir, path, tmp_path / "run", **{"trainer.max_steps": 2})
    with pytest.warns(UserWarning) as record:
        code, output = run_fit(argv, capsys)
    assert code == 0, output
    messages = " ".join(str(w.message) for w in record)
    assert "longer than model.max_length=64 tokens and were truncated" in messages
    assert "1 line" in messages or "replacement" in messages


@pytest.mark.slow  # a whole fit
def test_empty_texts_and_groups_warn_with_counts_and_empty_texts_can_be_dropped(tiny_backbone_dir, tmp_path, capsys):
    path = write_reviews_csv(tmp_path / "reviews.csv", n=60)
    with open(path, "a") as f:
        f.write(",pos,cinema\n  ,neg,kitchen\n,pos,cinema\ngood plot,pos,\nbad food,neg,\n")
    argv = tiny_run_overrides(tiny_backbone_dir, path, tmp_path / "run", **{"trainer.max_steps": 2})
    with pytest.warns(UserWarning) as record:
        code, output = run_fit([*argv, "data.drop_empty_texts=true"], capsys)
    assert code == 0, output
    messages = [str(w.message) for w in record]
    assert any("3 of 65 rows have an empty text in column 'review'; they were dropped" in m for m in messages)
    assert any("2 of 65 rows have no value in group column 'site'; they belong to no group" in m for m in messages)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "val/acc/" not in metrics  # no group named ""


@pytest.mark.slow  # a whole fit
def test_resume_of_a_finished_run_prints_its_metrics(tiny_backbone_dir, reviews_csv, tmp_path, capsys):
    """It used to train nothing, print `training time: nan s` and write NaN into metrics.json."""
    run = tmp_path / "run"
    assert run_fit(tiny_run_overrides(tiny_backbone_dir, reviews_csv, run, **{"trainer.max_steps": 2}), capsys)[0] == 0
    before = (run / "metrics.json").read_bytes()
    code, output = run_fit(["--resume", run], capsys)
    assert code == 0, output
    assert f"{run} has already finished; nothing to resume. Its metrics:" in output
    assert "val/acc:" in output and "nan" not in output.lower()
    assert output.strip().splitlines()[-1] == f"run directory: {run}"
    assert (run / "metrics.json").read_bytes() == before
    json.loads(before, parse_constant=lambda name: pytest.fail(f"metrics.json holds {name}"))


def test_resume_without_checkpoint_and_fresh_run_over_old_one(tiny_backbone_dir, reviews_csv, tmp_path, capsys):
    argv = tiny_run_overrides(tiny_backbone_dir, reviews_csv, tmp_path / "run", **{"trainer.max_steps": 2})
    assert run_fit(argv, capsys)[0] == 0
    assert_clean_failure(*run_fit(argv, capsys), "already holds checkpoints: continue it with --resume")
    assert_clean_failure(*run_fit(["--resume", tmp_path / "nowhere"], capsys), "is not a run directory")


def test_evaluate_on_validation_split_and_on_a_file(tiny_backbone_dir, reviews_csv, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_fit(tiny_run_overrides(tiny_backbone_dir, reviews_csv, run, **{"trainer.max_steps": 4}), capsys)[0] == 0
    assert main(["evaluate", run]) == 0
    assert "val/acc" in capsys.readouterr().out and (run / "eval-val.json").is_file()
    other = write_reviews_csv(tmp_path / "other.csv", n=30, seed=5)
    assert main(["evaluate", run, "--data", other]) == 0
    assert (run / "eval-other.json").is_file()


def test_non_finite_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(
    tiny_backbone_dir, reviews_csv, tmp_path, capsys, monkeypatch
):
    poison_loss_from_step(monkeypatch, 6)
    run = tmp_path / "run"
    argv = tiny_run_overrides(tiny_backbone_dir, reviews_csv, run, **{"trainer.max_steps": 20})
    assert_clean_failure(*run_fit(argv, capsys), "non-finite loss nan at step 6")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step=4.ckpt"]


def test_module_help_lists_every_command(tmp_path):
    """`python -m moe_prefix.tools` (what the ablation runner starts) from outside the checkout."""
    proc = subprocess.run(
        [sys.executable, "-m", "moe_prefix.tools", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^ {4}(\w+) ", proc.stdout, re.MULTILINE)
    assert listed == ["fit", "evaluate", "analyze", "ablate", "compare", "routing", "bench", "prefetch"]


def test_every_script_is_a_command():
    assert {p.stem.replace("_", "-") for p in (ROOT / "scripts").glob("*.py")} == set(COMMANDS)


def test_bench_is_offline_unless_asked(monkeypatch):
    from huggingface_hub import constants

    from moe_prefix.tools.cli import _offline_unless_asked

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    _offline_unless_asked()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.is_offline_mode()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _offline_unless_asked()
    assert not constants.is_offline_mode()


def test_router_features_transforms_are_one_comma_separated_option(capsys):
    """--transforms takes one comma-separated value, so overrides after it stay overrides; a bad name is a
    one-line error naming the choices (checked before any model loads)."""
    code = main(["router-features", "--transforms", "layernorm,pca", "threads=1"])
    captured = capsys.readouterr()
    assert_clean_failure(code, captured.out + captured.err, "unknown feature transform 'pca'")


# -- first run: a quick command line, a quiet fit, one summary block ------------------------------------


def test_help_and_argument_errors_import_neither_torch_nor_transformers():
    """`moe-prefix --help` and argument errors answer at once: torch, transformers and Lightning load only
    when a command runs."""
    script = (
        "import sys\n"
        "from moe_prefix.tools.cli import COMMANDS, main\n"
        "calls = [['--help'], ['fit', '--bogus'], ['nope'], ['prefetch', 'nope'], ['bench', '--clock', 'x']]\n"
        "for argv in calls + [[name, '--help'] for name in COMMANDS]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, 2), (argv, exit.code)\n"
        "    else:\n"
        "        raise AssertionError(argv)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'lightning', 'numpy', 'omegaconf') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_package_names_load_on_first_use():
    script = "import sys, moe_prefix\nassert 'torch' not in sys.modules\nprint(moe_prefix.PrefixMixture.__module__)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "moe_prefix.mixture"


def _cfg(**overrides):
    from moe_prefix.train.run_config import load_config

    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def test_summary_block_reports_task_metric_routing_health_size_time_and_ends_with_the_run_directory():
    from moe_prefix.tools.cli import summary_block

    metrics = {
        "val/acc": 0.81234,
        "val/acc/movies": 0.8,
        "val/acc/tweets": 0.9,
        "val/loss": 0.45,
        "val/dead_experts": 1,
        "val/nmi": 0.41,
        "val/load/e0": 0.5,
        "trainable_params": 297222,
        "train_time_s": 50.3,
        "steps": 583,
    }
    text = summary_block(metrics, _cfg(name="moe4"), Path("runs/moe4-1"))
    lines = text.splitlines()
    assert lines[0].startswith("-- moe4 (seed 0) --")
    assert lines[1:] == [
        "val/acc: 0.8123 (movies 0.8000, tweets 0.9000)",
        "val/loss: 0.4500",
        "dead experts: 1 of 4",
        "routing NMI with group: 0.4100",
        "trainable parameters: 297,222",
        "training time: 50.3 s (583 steps)",
        "run directory: runs/moe4-1",
    ]
    # named after the group column; generation records carry their group themselves (column null)
    for column, shown in (("domain", "domain"), ("null", "group")):
        text = summary_block(metrics, _cfg(**{"data.group_column": column}), Path("runs/x"))
        assert f"routing NMI with {shown}: 0.4100" in text.splitlines()


def test_summary_block_leaves_out_what_a_run_did_not_measure():
    from moe_prefix.tools.cli import summary_block

    metrics = {"val/bleu": 61.2, "val/ser": 0.02, "val/loss": 1.5, "trainable_params": 1000}
    cfg = _cfg(**{"model.method": "lora", "data.group_column": "null"})
    lines = summary_block(metrics, cfg, "r").splitlines()[1:]
    assert lines == [
        "val/bleu: 61.2000",
        "val/ser: 0.0200",
        "val/loss: 1.5000",
        "trainable parameters: 1,000",
        "run directory: r",
    ]


def test_warnings_print_as_one_line():
    from moe_prefix.tools.cli import one_line_warning

    ours = one_line_warning(
        UserWarning("3 of 9 texts were truncated"), UserWarning, str(ROOT / "moe_prefix" / "x.py"), 7
    )
    assert ours == "warning: 3 of 9 texts were truncated\n"
    theirs = one_line_warning(UserWarning("odd"), UserWarning, "/lib/lightning/trainer.py", 12, "source line")
    assert theirs == "/lib/lightning/trainer.py:12: UserWarning: odd\n"


@pytest.mark.slow  # a whole fit, in its own process as a user starts it
def test_a_fit_prints_no_lightning_noise_and_ends_with_the_summary_block(tiny_backbone_dir, tmp_path):
    path = write_reviews_csv(tmp_path / "reviews.csv", n=60)
    with open(path, "a") as f:
        f.write("good movie " + "plot " * 80 + ",pos,cinema\n")  # one long text: the truncation warning
    run = tmp_path / "run"
    argv = [o for o in tiny_run_overrides(tiny_backbone_dir, path, run) if "enable_model_summary" not in o]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "moe_prefix.tools", "fit", *argv], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    for noise in ("GPU available", "TPU available", "FLOPs", "Flops", "Loading `train_dataloader`"):
        assert noise not in output, noise
    # At most two warning lines: the truncation (one line for both splits) and, if this tiny run's routing
    # collapses, the collapse, once although two Trainers run.
    warning_lines = [line for line in output.splitlines() if "warning" in line.lower()]
    assert 1 <= len(warning_lines) <= 2, output
    assert warning_lines[0] == (
        "warning: 1 of 49 training and 0 of 12 validation texts are longer than model.max_length=64 tokens and "
        "were truncated"
    )
    assert all(line.startswith("warning: routing collapse: expert ") for line in warning_lines[1:]), output
    assert "trainable params: 1.2 K, frozen:" in output  # the model summary stays, without FLOPs
    lines = proc.stdout.strip().splitlines()
    block = lines[next(i for i, line in enumerate(lines) if line.startswith("-- run (seed 0) --")) + 1 :]
    dead = int(json.loads((run / "metrics.json").read_text())["val/dead_experts"])
    assert [line.split(":")[0] for line in block] == [
        "val/acc",
        "val/f1",
        "val/loss",
        "dead experts",
        "routing NMI with site",
        "trainable parameters",
        "training time",
        "run directory",
    ], proc.stdout
    assert "(cinema " in block[0] and block[3] == f"dead experts: {dead} of 2"
    assert block[-1] == f"run directory: {run}"


def _fill_disk_at(monkeypatch, target: str, nth: int = 1) -> list[str]:
    """The nth write of a file named `target` (a checkpoint or a run file) fills its first bytes, then fails
    with ENOSPC, as on a full disk; returns the names it failed on."""
    from safetensors.torch import save as safetensors_bytes

    from moe_prefix.train import checkpointing

    failed, seen = [], []
    real_save_file, real_write_text = checkpointing.save_file, Path.write_text

    def full(name: str) -> bool:
        seen.append(name)
        return target in name and sum(target in n for n in seen) == nth and not failed

    def save_file(tensors, filename, metadata=None):
        if not full(filename):
            return real_save_file(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(safetensors_bytes(tensors, metadata=metadata)[:100])
        failed.append(filename)
        raise OSError(errno.ENOSPC, "No space left on device")

    def write_text(self, text, *args, **kwargs):
        if not full(str(self)):
            return real_write_text(self, text, *args, **kwargs)
        real_write_text(self, text[:10])
        failed.append(str(self))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing, "save_file", save_file)
    monkeypatch.setattr(Path, "write_text", write_text)
    return failed


@pytest.mark.slow  # three whole fits each
@pytest.mark.parametrize(
    "target,nth,kept",
    [("step=", 2, "last.ckpt (step 4)"), ("metrics.json", 1, "last.ckpt (step 12)")],
    ids=["checkpoint", "run-file"],
)
def test_full_disk_stops_in_one_line_and_resume_ends_like_an_undisturbed_run(
    tiny_backbone_dir, reviews_csv, tmp_path, capsys, monkeypatch, target, nth, kept
):
    """A checkpoint (the second, step 8) or metrics.json cannot be written: one line naming the file, the
    intact checkpoint and the --resume command; no partial file under a final name; --resume then ends with
    the metrics of a run that was never disturbed."""
    extra = {"trainer.max_steps": 12, "checkpoint_every_n_steps": 4}
    assert run_fit(tiny_run_overrides(tiny_backbone_dir, reviews_csv, tmp_path / "ref", **extra), capsys)[0] == 0
    want = json.loads((tmp_path / "ref" / "metrics.json").read_text())

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        failed = _fill_disk_at(patch, target, nth)
        code, output = run_fit(tiny_run_overrides(tiny_backbone_dir, reviews_csv, run, **extra), capsys)
    assert len(failed) == 1, failed
    final_name = Path(failed[0]).name.removeprefix(".").rsplit(".tmp-", 1)[0]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: run stopped: writing {Path(failed[0]).parent / final_name} failed (No space left on device); "
        f"the last good checkpoint, {run / 'checkpoints' / kept}, is intact; free some space, then continue with: "
        f"moe-prefix fit --resume {run}"
    ], output
    assert_clean_failure(code, output, "error: run stopped")
    assert not (run / "metrics.json").exists()
    assert not (Path(failed[0]).parent / final_name).exists()  # no partial file under the final name
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]  # nor a hidden one left behind
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        load_checkpoint_file(ckpt)  # all intact

    code, output = run_fit(["--resume", run], capsys)
    assert code == 0, output
    got = json.loads((run / "metrics.json").read_text())
    for key in ("val/acc", "val/loss", "val/f1"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert got["steps"] == want["steps"] == 12


def test_the_model_summary_takes_what_the_installed_lightning_passes():
    """_ModelSummary overrides Lightning's summarize(), whose arguments changed between releases (total_flops came in
    2.5); a one-step fit with the installed Lightning calls it as a run does (the slow test above is not run on the
    lowest versions)."""
    import lightning as L
    import torch

    from moe_prefix.train.engine import _ModelSummary

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, _):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2, 2)), batch_size=2)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[_ModelSummary()], accelerator="cpu")  # fmt: skip
    trainer.fit(Tiny(), data)
