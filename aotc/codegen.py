"""Writes a self-contained build tree: one source per translation unit, headers, CMakeLists.txt.

Files are rewritten only when their content changes, so Ninja rebuilds only what changed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from aotc.families import FAMILIES
from aotc.families.base import IncludeRoot, KernelSymbol, TranslationUnit
from aotc.manifest import Manifest
from aotc.mlx_info import files_sha256
from aotc.targets import TARGETS
from aotc.targets.base import CMakeInputs, Toolchain

TREE_FILE = "aotc-tree.json"
_QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


@dataclass(frozen=True)
class BuildTree:
    root: Path
    library: str
    target: str
    units: tuple[TranslationUnit, ...]
    headers_sha256: dict[str, str]  # include-root origin ("mlx", "aotc") -> digest
    written: tuple[Path, ...]  # files whose content changed in this generation

    @property
    def kernels(self) -> list[KernelSymbol]:
        return [kernel for unit in self.units for kernel in unit.kernels]

    @property
    def binary_dir(self) -> Path:
        return self.root / "out"


def tree_root(build_dir: Path, library: str, target: str) -> Path:
    return build_dir / library / target


def generate(
    manifest: Manifest, target_name: str, build_dir: Path, toolchain: Toolchain | None = None
) -> BuildTree:
    target = TARGETS[target_name]
    root = tree_root(build_dir, manifest.library, target_name)
    units = translation_units(manifest, target_name)
    written: list[Path] = []
    sources = {f"{unit.stem}{target.source_suffix}": unit.source for unit in units}
    written += _sync_folder(root / "src", sources)
    headers, digests = _collect_headers(manifest, target_name)
    written += _sync_folder(root / "include", headers)
    programs = toolchain.programs if toolchain else target.default_programs()
    inputs = CMakeInputs(
        manifest.library, tuple(u.stem for u in units), tuple(sorted(headers)), programs
    )
    options = manifest.targets[target_name]
    written += _write_if_changed(root / "CMakeLists.txt", target.cmake_lists(inputs, options))
    tree = BuildTree(root, manifest.library, target_name, tuple(units), digests, tuple(written))
    written += _write_if_changed(root / TREE_FILE, _describe(tree, manifest))
    return BuildTree(root, manifest.library, target_name, tuple(units), digests, tuple(written))


def translation_units(manifest: Manifest, target: str) -> list[TranslationUnit]:
    insts = manifest.for_target(target)
    units: list[TranslationUnit] = []
    for name, family in FAMILIES.items():
        mine = [inst for inst in insts if inst.family == name]
        if mine:
            units += family.translation_units(target, mine)
    return units


def _collect_headers(manifest: Manifest, target: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """The include closure of every family used, copied so the tree builds on another machine."""
    files: dict[str, bytes] = {}
    digests: dict[str, str] = {}
    used = {inst.family for inst in manifest.for_target(target)}
    for name in sorted(used):
        for root in FAMILIES[name].include_roots(target):
            missing = [rel for rel in root.files if not (root.base / rel).is_file()]
            if missing:
                raise FileNotFoundError(f"{name} needs {', '.join(missing)} under {root.base}")
            closure = include_closure(root)
            for rel in closure:
                files[rel] = (root.base / rel).read_bytes()
            digests[root.origin] = files_sha256(root.base, closure)
    return files, digests


def installed_header_digest(families: set[str], target: str, origin: str = "mlx") -> str | None:
    """The digest `aotc build` would record today for the `origin` headers ("mlx": MLX's, "aotc":
    this aotc's kernel templates) of these families' `target` sources, as `_collect_headers`
    keeps it (the last family's); None when none of them uses such headers. Raises
    FileNotFoundError when the headers are not installed."""
    digest = None
    for name in sorted(families):
        for root in FAMILIES[name].include_roots(target):
            if root.origin == origin:
                digest = files_sha256(root.base, include_closure(root))
    return digest


def include_closure(root: IncludeRoot) -> list[str]:
    """`root.files` and every quoted include they reach under `root.base`."""
    pending, seen = list(root.files), set()
    while pending:
        rel = pending.pop()
        if rel in seen or not (root.base / rel).is_file():
            continue
        seen.add(rel)
        text = (root.base / rel).read_text(encoding="utf-8", errors="replace")
        for include in _QUOTED_INCLUDE.findall(text):
            beside = str(Path(rel).parent / include)
            pending.append(beside if (root.base / beside).is_file() else include)
    return sorted(seen)


def _sync_folder(folder: Path, files: dict[str, str | bytes]) -> list[Path]:
    """Make `folder` hold exactly `files`: stale sources would otherwise linger unseen."""
    written = []
    for rel, content in files.items():
        written += _write_if_changed(folder / rel, content)
    if folder.is_dir():
        for path in sorted(folder.rglob("*"), reverse=True):
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and rel not in files:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    return written


def _write_if_changed(path: Path, content: str | bytes) -> list[Path]:
    data = content.encode() if isinstance(content, str) else content
    if path.is_file() and path.read_bytes() == data:
        return []
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return [path]


def _describe(tree: BuildTree, manifest: Manifest) -> str:
    """What the tree holds, for `aotc build` on this tree and for a Mac that builds it alone."""
    units = [
        {
            "stem": unit.stem,
            "kernels": [k.to_json() for k in unit.kernels],
            "origins": [str(origin) for origin in unit.origins],
        }
        for unit in tree.units
    ]
    data = {
        "library": tree.library,
        "target": tree.target,
        "options": manifest.targets[tree.target].to_json(),
        "headers_sha256": tree.headers_sha256,
        "units": units,
    }
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
