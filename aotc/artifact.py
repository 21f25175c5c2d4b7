"""Artifacts and their index: checksums, the JSON schema, and atomic publication into dist/."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aotc import __version__
from aotc.errors import AotcError

SCHEMA_VERSION = 1


class BadIndex(AotcError):
    """An index file that cannot be used."""

    exit_code = 5


@dataclass(frozen=True)
class Index:
    """A parsed `<library>.<target>.json`, next to its artifact."""

    path: Path
    data: dict

    @property
    def library(self) -> str:
        return self.data["library"]

    @property
    def target(self) -> str:
        return self.data["target"]

    @property
    def artifact_path(self) -> Path:
        return self.path.parent / self.data["artifact"]["file"]

    @property
    def kernels(self) -> list[dict]:
        return self.data["kernels"]

    @property
    def kernel_names(self) -> set[str]:
        return {kernel["name"] for kernel in self.kernels}

    @property
    def mlx_version(self) -> str | None:
        return self.data["mlx"].get("version")


def index_name(library: str, target: str) -> str:
    return f"{library}.{target}.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_index(
    *,
    library: str,
    target: str,
    artifact: Path,
    kernels: list[dict],
    options: dict,
    toolchain: dict,
    flags: list[str],
    mlx_version: str | None,
    headers_sha256: dict[str, str],
) -> dict:
    return {
        "schema": SCHEMA_VERSION,
        "aotc_version": __version__,
        "library": library,
        "target": target,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "artifact": {
            "file": artifact.name,
            "sha256": sha256_file(artifact),
            "bytes": artifact.stat().st_size,
        },
        "mlx": {"version": mlx_version, "headers_sha256": headers_sha256.get("mlx")},
        "sources_sha256": headers_sha256,
        "toolchain": {**toolchain, "flags": flags},
        "options": options,
        "kernels": kernels,
    }


def publish(artifact: Path, index: dict, out_dir: Path) -> tuple[Path, Path]:
    """Copy the artifact, then its index, into `out_dir`, each by an atomic rename.

    Readers see either the old pair or the new artifact; the index (written last) is what makes a
    library visible, and its checksum tells a reader when the pair does not belong together.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    artifact_dest = out_dir / artifact.name
    index_dest = out_dir / index_name(index["library"], index["target"])
    _atomic_write(artifact_dest, artifact.read_bytes())
    _atomic_write(index_dest, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    return artifact_dest, index_dest


def read_index(path: Path) -> Index:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadIndex(f"{path}: not a readable aotc index ({exc})") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
        raise BadIndex(
            f"{path}: unsupported index schema {data.get('schema')!r}"
            if isinstance(data, dict)
            else f"{path}: not an aotc index"
        )
    for key in ("library", "target", "artifact", "mlx", "kernels"):
        if key not in data:
            raise BadIndex(f"{path}: index lacks {key!r}")
    return Index(path, data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(dest: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide artifacts from other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
