"""Compile kernels/*.cu ahead of time with nvcc into a fat binary (one per source), for the
GPUs specedge targets: Jetson Orin (sm_87), data-centre Hopper (sm_90), and PTX for newer ones.

    python -m specedge.kernels.build [--out DIR] [--arch 87,90]

`make test` runs it through tests/test_kernels.py wherever nvcc exists (CI does).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

SOURCES = sorted(Path(__file__).resolve().parent.glob("*.cu"))
ARCHS = (87, 90)


def nvcc() -> str | None:
    return shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).exists()), None)


def build(out: str | Path, archs=ARCHS, exe: str | None = None) -> list[Path]:
    exe = exe or nvcc()
    if exe is None:
        raise FileNotFoundError("nvcc not found (install the CUDA toolkit)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{max(archs)},code=compute_{max(archs)}")
    built = []
    for source in SOURCES:
        target = out / f"{source.stem}.fatbin"
        done = subprocess.run([exe, "--fatbin", "-O3", "-Werror", "all-warnings", *flags, "-o", str(target),
                               str(source)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source.name}:\n{done.stderr}")
        built.append(target)
    return built


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "build"))
    p.add_argument("--arch", default=",".join(map(str, ARCHS)))
    args = p.parse_args()
    for path in build(args.out, [int(a) for a in args.arch.split(",")]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
