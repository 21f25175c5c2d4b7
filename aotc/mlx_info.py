"""Facts about the installed MLX that builds and loaders must agree on."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from functools import cache
from pathlib import Path


@cache
def mlx_version() -> str | None:
    try:
        return importlib.metadata.version("mlx")
    except importlib.metadata.PackageNotFoundError:
        return None


@cache
def mlx_include_dir() -> Path | None:
    """`<site-packages>/mlx/include`, found without importing MLX (no GPU start-up)."""
    spec = importlib.util.find_spec("mlx")
    for location in (spec.submodule_search_locations or []) if spec else []:
        include = Path(location) / "include"
        if (include / "mlx").is_dir():
            return include
    return None


def files_sha256(base: Path, files: list[str]) -> str:
    """One digest over named files (path and content), independent of where `base` lies."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0")
        digest.update((base / name).read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()
