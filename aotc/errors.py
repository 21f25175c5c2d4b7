"""Errors a user can act on: each says what was wrong and where."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class AotcError(Exception):
    """Base class; the CLI prints these without a traceback."""

    exit_code = 1


@dataclass(frozen=True)
class Location:
    """A place in a manifest: file, 1-based line, and the key path (e.g. `kernels[0].dtypes[2]`)."""

    path: Path
    line: int
    key: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.key}" if self.key else f"{self.path}:{self.line}"


class ManifestError(AotcError):
    """An invalid manifest; `location` points at the offending node."""

    exit_code = 2

    def __init__(self, message: str, location: Location | None = None) -> None:
        self.message = message
        self.location = location
        super().__init__(f"{location}: {message}" if location else message)


class ToolchainMissing(AotcError):
    """A compiler the target needs is absent; the message says what to do instead."""

    exit_code = 3


class BuildFailed(AotcError):
    """The generated build failed; the message carries the compiler's output and its origin."""

    exit_code = 4
