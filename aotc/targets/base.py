"""What a build target provides: options, toolchain discovery and the CMake project text."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Protocol

from aotc.located_yaml import Node


@dataclass(frozen=True)
class Toolchain:
    """Compilers found on this machine, by role (e.g. {"nvcc": "/usr/local/bin/nvcc"})."""

    name: str
    version: str
    programs: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "programs": dict(self.programs)}


@dataclass(frozen=True)
class CMakeInputs:
    """Everything a target needs to write its CMakeLists.txt."""

    library: str
    units: tuple[str, ...]  # translation-unit stems, sources under src/
    headers: tuple[str, ...]  # paths under include/
    programs: dict[str, str]  # role -> program (absolute, or a bare name resolved on the Mac)


class TargetOptions(Protocol):
    def to_json(self) -> dict: ...

    def compile_flags(self) -> list[str]: ...


class Target(Protocol):
    name: str
    artifact_suffix: str
    source_suffix: str

    def parse_options(self, node: Node | None) -> TargetOptions: ...

    def find_toolchain(self) -> Toolchain:
        """The toolchain, or raise ToolchainMissing saying what to do."""
        ...

    def default_programs(self) -> dict[str, str]:
        """Programs the generated project calls when no toolchain was found here."""
        ...

    def cmake_lists(self, inputs: CMakeInputs, options: TargetOptions) -> str: ...


def program_output(argv: list[str]) -> str:
    """stdout+stderr of a short query command (e.g. `--version`), '' when it cannot run."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout + done.stderr


def which(program: str) -> str | None:
    return shutil.which(program)


def cmake_list(items: list[str] | tuple[str, ...], indent: str = "    ") -> str:
    """Items one per line, quoted for CMake."""
    return "\n".join(f'{indent}"{item}"' for item in items)


def check_choice(node: Node, value: object, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise node.error(f"unknown {what} {value!r} (allowed: {', '.join(allowed)})")


def reject_unknown_keys(node: Node, mapping: dict[str, Node], allowed: tuple[str, ...]) -> None:
    for key, child in mapping.items():
        if key not in allowed:
            raise child.error(f"unknown key {key!r} in {node.key} (allowed: {', '.join(allowed)})")
