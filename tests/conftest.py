"""Shared fixtures: the team's shared/ folder, small manifests, and skip reasons."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"the team's shared/ folder is not beside the checkout ({SHARED})")
    return SHARED


@pytest.fixture
def write_manifest(tmp_path: Path) -> Callable[[str], Path]:
    """Write a manifest from an indented YAML string into tmp_path."""

    def write(text: str, name: str = "manifest.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    return write


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")


def cuobjdump() -> str | None:
    """NVIDIA's cuobjdump: on PATH, or from the `nvidia-cuda-cuobjdump` wheel (a test extra)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        for candidate in sorted(Path(root).glob("cu*/bin/cuobjdump"), reverse=True):
            return str(candidate)
    return None


def cuobjdump_resources(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """(REG, STACK) of every function per SASS arch, as `cuobjdump -res-usage` prints them."""
    listing = subprocess.run(
        [cuobjdump(), "-res-usage", str(path)], capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, dict[str, tuple[int, int]]] = {}
    arch = function = None
    for line in (line.strip() for line in listing.splitlines()):
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("Function "):
            function = line.removeprefix("Function ").rstrip(":")
        elif function and line.startswith("REG:"):
            fields = dict(item.split(":", 1) for item in line.split())
            result.setdefault(arch, {})[function] = (int(fields["REG"]), int(fields["STACK"]))
            function = None
    return result
