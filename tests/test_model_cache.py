"""The converted-model caches (converted/<sha>/ for our loader, the -hf- folder for vLLM) are
checked against the hashes recorded when they were written: a damaged cache is rebuilt from the
GGUF, with a warning, and never loaded as it is. Real files on disk throughout."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from specedge import loader
from specedge.fetch import sha256_file


@pytest.fixture
def cached(tiny_files, tmp_path, monkeypatch):
    """(gguf path, its sha256, the weights its first load returned): the cache now written."""
    monkeypatch.setenv("SPECEDGE_CACHE", str(tmp_path))
    path = tiny_files[1]
    sha = sha256_file(path)
    _, weights, _ = loader.read_checkpoint(path, sha)
    assert (loader._converted_dir(sha) / "weights.safetensors").exists()
    return path, sha, weights


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def flip_a_weight_byte(file) -> None:
    """Change one byte of tensor data near the end: the file stays valid safetensors, its header
    and length intact, so only a hash can tell."""
    data = bytearray(file.read_bytes())
    data[-7] ^= 0x5A
    file.write_bytes(bytes(data))


def rebuilt(caplog) -> bool:
    return any(r.levelno == logging.WARNING and "rebuilding" in r.getMessage() for r in caplog.records)


def test_a_cached_safetensors_with_a_flipped_byte_is_rebuilt_not_loaded(cached, caplog):
    path, sha, first = cached
    weights_file = loader._converted_dir(sha) / "weights.safetensors"
    flip_a_weight_byte(weights_file)
    with caplog.at_level(logging.WARNING, "specedge.loader"):
        _, weights, _ = loader.read_checkpoint(path, sha)
    assert same(weights, first)
    assert rebuilt(caplog)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "specedge.loader"):  # the rebuilt cache is good again
        _, again, _ = loader.read_checkpoint(path, sha)
    assert same(again, first) and not rebuilt(caplog)


def test_a_truncated_cached_safetensors_is_rebuilt_from_the_gguf(cached, caplog):
    path, sha, first = cached
    weights_file = loader._converted_dir(sha) / "weights.safetensors"
    size = weights_file.stat().st_size
    os.truncate(weights_file, size // 2)
    with caplog.at_level(logging.WARNING, "specedge.loader"):
        _, weights, _ = loader.read_checkpoint(path, sha)
    assert same(weights, first) and rebuilt(caplog)
    assert weights_file.stat().st_size == size


def test_a_damaged_cached_config_or_tokenizer_is_rebuilt(cached, caplog):
    path, sha, first = cached
    conv = loader._converted_dir(sha)
    (conv / "config.json").write_text('{"vocab_size": 1}')
    (conv / "tokenizer.json").write_text("{}")
    with caplog.at_level(logging.WARNING, "specedge.loader"):
        cfg, weights, tok = loader.read_checkpoint(path, sha)
    assert rebuilt(caplog) and same(weights, first)
    assert cfg.vocab_size == first["token_embd.weight"].shape[0] and tok.encode("the") != []


def test_a_cache_without_recorded_hashes_is_rebuilt(cached, caplog):
    """Caches written before hashes were recorded (their `done` holds the GGUF's sha256 only)
    cannot be checked: rebuilt once, then checked like any other."""
    path, sha, first = cached
    conv = loader._converted_dir(sha)
    (conv / "done").write_text(sha)
    flip_a_weight_byte(conv / "weights.safetensors")
    with caplog.at_level(logging.WARNING, "specedge.loader"):
        _, weights, _ = loader.read_checkpoint(path, sha)
    assert same(weights, first) and rebuilt(caplog)


def test_the_hf_folder_with_a_damaged_safetensors_is_rebuilt(cached, caplog):
    path, sha, _ = cached
    folder = loader.hf_dir(path, sha)
    model_file = folder / "model.safetensors"
    good = model_file.read_bytes()
    flip_a_weight_byte(model_file)
    with caplog.at_level(logging.WARNING, "specedge.loader"):
        assert loader.hf_dir(path, sha) == folder
    assert rebuilt(caplog) and model_file.read_bytes() == good
    caplog.clear()
    os.truncate(model_file, 100)
    with caplog.at_level(logging.WARNING, "specedge.loader"):
        loader.hf_dir(path, sha)
    assert rebuilt(caplog) and model_file.read_bytes() == good


def test_cache_files_and_folder_are_fsynced_before_the_rename(tiny_files, tmp_path, monkeypatch):
    """A crash after the rename must not leave a `done` folder whose files never reached the disk.
    os.fsync is wrapped to record what it flushed (the real fsync still runs)."""
    monkeypatch.setenv("SPECEDGE_CACHE", str(tmp_path))
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst, **kw):
        events.append(("rename", str(src), str(dst)))
        real_rename(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    path = tiny_files[1]
    sha = sha256_file(path)
    loader.read_checkpoint(path, sha)
    conv = loader._converted_dir(sha)
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(conv)]
    assert len(renames) == 1, events
    tmp = events[renames[0]][1]
    synced_before = {e[1] for e in events[:renames[0]] if e[0] == "fsync"}
    names = {"weights.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "done"}
    assert {f"{tmp}/{n}" for n in names} | {tmp} <= synced_before
    assert ("fsync", str(conv.parent)) in events[renames[0]:]  # the rename itself made durable
