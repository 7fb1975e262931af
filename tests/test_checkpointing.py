"""Safetensors checkpoints: round trip, atomic writes, corrupted files, weights for another backbone."""

import errno
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save as safetensors_bytes

from moe_prefix.train.checkpointing import (
    CheckpointError,
    check_compatible,
    checkpoint_step,
    load_checkpoint_file,
    save_checkpoint_file,
    write_atomically,
)


def _checkpoint():
    return {
        "epoch": 2,
        "global_step": 17,
        "state_dict": {"network.body.bank.kv": torch.randn(2, 3)},
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
                "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0]}],
            }
        ],
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 3}}}, "flag": None, "x": float("inf")},
    }


def test_round_trip_keeps_types(tmp_path):
    ckpt = _checkpoint()
    save_checkpoint_file(ckpt, tmp_path / "a.ckpt")
    back = load_checkpoint_file(tmp_path / "a.ckpt")
    assert back["global_step"] == 17 and back["loops"]["flag"] is None and back["loops"]["x"] == float("inf")
    assert torch.equal(back["state_dict"]["network.body.bank.kv"], ckpt["state_dict"]["network.body.bank.kv"])
    state = back["optimizer_states"][0]["state"]
    assert list(state) == [0] and torch.equal(state[0]["exp_avg"], torch.ones(2))  # int keys survive
    assert back["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples survive


def test_no_pickle_anywhere(tmp_path):
    save_checkpoint_file(_checkpoint(), tmp_path / "a.ckpt")
    raw = (tmp_path / "a.ckpt").read_bytes()
    assert b"\x80\x04" not in raw[:64] and raw[8:9] == b"{"  # a safetensors JSON header, not a pickle


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_checkpoint_file(_checkpoint(), path)
    before = path.read_bytes()
    written = []

    def killed_mid_write(tensors, filename, metadata=None):
        # A kill halfway through: the target of the write holds the first half of the new file's bytes.
        new = safetensors_bytes(tensors, metadata=metadata)
        Path(filename).write_bytes(new[: len(new) // 2])
        written.append(Path(filename).stat().st_size)
        raise KeyboardInterrupt

    monkeypatch.setattr("moe_prefix.train.checkpointing.save_file", killed_mid_write)
    newer = _checkpoint() | {"global_step": 18}
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_file(newer, path)
    assert len(written) == 1 and written[0] > 0  # the partial file really was written
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # and then removed
    back = load_checkpoint_file(path)
    assert back["global_step"] == 17 and back["state_dict"]["network.body.bank.kv"].shape == (2, 3)


def _half_then(error):
    """A writer that fills half its file, then fails as a full disk does."""

    def write(tensors, filename, metadata=None):
        new = safetensors_bytes(tensors, metadata=metadata)
        Path(filename).write_bytes(new[: len(new) // 2])
        raise error

    return write


@pytest.mark.parametrize(
    "error",
    [
        # safetensors' own words for ENOSPC (its Rust writer raises no OSError)
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["safetensors", "oserror"],
)
def test_full_disk_names_the_file_and_leaves_no_partial_file(tmp_path, monkeypatch, error):
    path = tmp_path / "last.ckpt"
    save_checkpoint_file(_checkpoint(), path)
    before = path.read_bytes()
    monkeypatch.setattr("moe_prefix.train.checkpointing.save_file", _half_then(error))
    with pytest.raises(OSError) as info:
        save_checkpoint_file(_checkpoint() | {"global_step": 18}, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert "No space left on device" in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and path.read_bytes() == before
    assert checkpoint_step(path) == 17


def test_atomic_text_write_keeps_the_old_file_on_a_full_disk(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("{}\n")

    def half_then_full(tmp):
        tmp.write_text('{"val/a')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left on device") as info:
        write_atomically(path, half_then_full)
    assert info.value.filename == str(path)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"] and path.read_text() == "{}\n"


def test_checkpoint_step_reads_the_header_only(tmp_path):
    save_checkpoint_file(_checkpoint(), tmp_path / "a.ckpt")
    (tmp_path / "b.ckpt").write_bytes(b"not a checkpoint")
    assert checkpoint_step(tmp_path / "a.ckpt") == 17
    assert checkpoint_step(tmp_path / "b.ckpt") is None


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_file_fails_clearly(tmp_path, damage):
    path = tmp_path / "a.ckpt"
    save_checkpoint_file(_checkpoint(), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x00" * 40 + raw[40:])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint_file(path)


def test_weights_for_another_backbone_name_both():
    saved = {"body.bank.kv": torch.zeros(4, 6, 2, 12, 16, 32)}
    here = {"body.bank.kv": torch.zeros(4, 30, 2, 3, 16, 64)}
    with pytest.raises(CheckpointError, match="saved for backbone 'minilm' do not fit backbone 'smollm2-135m'"):
        check_compatible(saved, here, "minilm", "smollm2-135m")


def test_stopped_run_names_the_earlier_checkpoint_whose_rewrite_failed(tmp_path):
    from moe_prefix.train.engine import _resume_hint

    (tmp_path / "config.yaml").write_text("{}\n")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    save_checkpoint_file(_checkpoint(), ckpt)
    err = OSError(errno.ENOSPC, "No space left on device", str(ckpt))
    assert _resume_hint(tmp_path, err) == (
        f"the last good checkpoint, the earlier {ckpt} (step 17), is intact; free some space, then continue with: "
        f"moe-prefix fit --resume {tmp_path}"
    )
    assert _resume_hint(tmp_path / "elsewhere") == "nothing was trained yet; start the run again"
