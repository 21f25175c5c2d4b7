"""The manifest: which library to build, for which targets, with which kernel instantiations."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from aotc.errors import Location
from aotc.families import FAMILIES
from aotc.families.base import Instantiation
from aotc.located_yaml import Node, load
from aotc.targets import TARGETS
from aotc.targets.base import TargetOptions, check_choice, reject_unknown_keys

_TOP_KEYS = ("library", "targets", "kernels")
_ENTRY_KEYS = ("family", "dtypes", "targets")
# The library name becomes file names, CMake project names and wheel names.
_LIBRARY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


@dataclass(frozen=True)
class Manifest:
    path: Path
    library: str
    targets: dict[str, TargetOptions]
    instantiations: tuple[Instantiation, ...]
    warnings: tuple[str, ...] = ()

    def for_target(self, target: str) -> list[Instantiation]:
        return [inst for inst in self.instantiations if target in inst.targets]


def load_manifest(path: Path | str, text: str | None = None) -> Manifest:
    path = Path(path)
    root = load(path, text)
    top = root.mapping()
    reject_unknown_keys(root, top, _TOP_KEYS)
    library = _library_name(_required(root, top, "library"))
    targets = _targets(top.get("targets"), root)
    warnings: list[str] = []
    seen: dict[Instantiation, Location] = {}
    kernels = _required(root, top, "kernels")
    for entry in kernels.sequence():
        for inst in _entry_instantiations(entry, targets):
            if inst in seen:
                warnings.append(f"{inst.origin}: {inst.label} repeats {seen[inst]}; merged")
                continue
            seen[inst] = inst.origin
            warnings += _dispatch_warnings(inst, targets)
    return Manifest(path, library, targets, tuple(seen), tuple(warnings))


def _dispatch_warnings(inst: Instantiation, targets: dict[str, TargetOptions]) -> list[str]:
    family = FAMILIES[inst.family]
    found = (
        family.dispatch_warning(target, targets[target], inst.dtype, dict(inst.params))
        for target in sorted(inst.targets)
    )
    return [f"{inst.origin}: {warning}" for warning in found if warning]


def _required(parent: Node, mapping: dict[str, Node], key: str) -> Node:
    if key not in mapping:
        where = f"{parent.key}" if parent.key else "the manifest"
        raise parent.error(f"missing required key {key!r} in {where}")
    return mapping[key]


def _library_name(node: Node) -> str:
    name = node.expect(str, "a library name")
    if not _LIBRARY_NAME.match(name):
        raise node.error(
            f"library name {name!r} is not a safe file name: use a letter, then letters, digits "
            "or '_' (at most 64 characters)"
        )
    return name


def _targets(node: Node | None, root: Node) -> dict[str, TargetOptions]:
    if node is None:
        return {name: target.parse_options(None) for name, target in TARGETS.items()}
    mapping = node.mapping()
    if not mapping:
        raise node.error("must name at least one target")
    result = {}
    for name, options in mapping.items():
        check_choice(options, name, tuple(TARGETS), "target")
        result[name] = TARGETS[name].parse_options(options)
    return result


def _entry_instantiations(entry: Node, targets: dict[str, TargetOptions]) -> list[Instantiation]:
    fields = entry.mapping()
    family_node = _required(entry, fields, "family")
    family_name = family_node.expect(str, "a family name")
    check_choice(family_node, family_name, tuple(FAMILIES), "family")
    family = FAMILIES[family_name]
    reject_unknown_keys(entry, fields, (*_ENTRY_KEYS, *sorted(family.entry_keys)))
    for key in sorted(family.entry_keys):
        _required(entry, fields, key)
    dtypes = _dtypes(_required(entry, fields, "dtypes"), family.dtypes)
    entry_targets = _entry_targets(fields.get("targets"), targets)
    result = []
    for params, where in family.parse_params(fields):
        for dtype in dtypes:
            for target in sorted(entry_targets):
                reason = family.unsupported_reason(target, dtype, dict(params))
                if reason:
                    raise where.error(f"{reason} (value {where.plain()!r})")
            inst = Instantiation(
                family_name, dtype, params, where.location, frozenset(entry_targets)
            )
            result.append(inst)
    return result


def _dtypes(node: Node, allowed: tuple[str, ...]) -> list[str]:
    result = []
    for item in node.sequence():
        dtype = item.expect(str, "a dtype name")
        check_choice(item, dtype, allowed, "dtype")
        result.append(dtype)
    return result


def _entry_targets(node: Node | None, targets: dict[str, TargetOptions]) -> frozenset[str]:
    """A kernels entry may narrow the manifest's targets (e.g. a CUDA-only head dim)."""
    if node is None:
        return frozenset(targets)
    names = []
    for item in node.sequence():
        name = item.expect(str, "a target name")
        check_choice(item, name, tuple(targets), "target for this entry")
        names.append(name)
    return frozenset(names)
