"""What a kernel family provides to the build: parsing, constraints, naming, generated sources."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from aotc.errors import Location
from aotc.located_yaml import Node

if TYPE_CHECKING:
    from aotc.targets.base import TargetOptions

# Manifest dtype -> the type name used in kernel names (MLX's Metal spelling, kept on every target).
KERNEL_TYPE_NAMES = {"float16": "float16_t", "bfloat16": "bfloat16_t", "float32": "float"}


@dataclass(frozen=True)
class Instantiation:
    """One (family, dtype, parameters) asked for by the manifest."""

    family: str
    dtype: str
    params: tuple[tuple[str, int], ...]
    origin: Location = field(compare=False)
    targets: frozenset[str] = field(compare=False, default=frozenset())

    def param(self, name: str) -> int:
        return dict(self.params)[name]

    @property
    def label(self) -> str:
        values = " ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.family} {self.dtype} {values}"


@dataclass(frozen=True)
class KernelSymbol:
    """One function in an artifact, as the index records it."""

    name: str
    family: str
    dtype: str
    params: tuple[tuple[str, int], ...]
    variant: str

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "dtype": self.dtype,
            "params": dict(self.params),
            "variant": self.variant,
        }


@dataclass(frozen=True)
class TranslationUnit:
    """One generated source file; `origins` are the manifest entries it serves."""

    stem: str
    source: str
    kernels: tuple[KernelSymbol, ...]
    origins: tuple[Location, ...]


@dataclass(frozen=True)
class IncludeRoot:
    """Headers a family's sources include: `files` are paths relative to `base`."""

    base: Path
    files: tuple[str, ...]
    origin: str  # "mlx" for MLX's installed headers, "aotc" for this project's kernels/


class Family(Protocol):
    name: str
    dtypes: tuple[str, ...]
    entry_keys: frozenset[str]  # manifest keys of a kernels entry besides family/dtypes/targets

    def parse_params(
        self, entry: dict[str, Node]
    ) -> list[tuple[tuple[tuple[str, int], ...], Node]]:
        """Each parameter set of an entry, with the node it came from."""
        ...

    def unsupported_reason(self, target: str, dtype: str, params: dict[str, int]) -> str | None:
        """Why this instantiation cannot be built for `target`, or None."""
        ...

    def dispatch_warning(
        self, target: str, options: TargetOptions, dtype: str, params: dict[str, int]
    ) -> str | None:
        """Why this instantiation, built, can never be dispatched on some of the GPUs the
        target's options build for (its calls fall back there), or None."""
        ...

    def translation_units(
        self, target: str, insts: Sequence[Instantiation]
    ) -> list[TranslationUnit]: ...

    def include_roots(self, target: str) -> list[IncludeRoot]: ...


def kernels_dir() -> Path:
    """This project's kernel templates: `$AOTC_KERNELS_DIR` (to develop kernels out of tree), the
    copy shipped inside the package, or `kernels/` in a checkout."""
    override = os.environ.get("AOTC_KERNELS_DIR")
    if override:
        return Path(override)
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "kernels", package.parent / "kernels"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"aotc's kernels/ folder is missing next to {package}")
