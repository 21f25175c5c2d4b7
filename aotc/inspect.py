"""What a compiled kernel file holds: Metal libraries and CUDA fatbins, recognised by magic.

``inspect_file`` returns JSON-ready data; ``render_inspection`` turns it into an aligned text
report. Both back ``aotc inspect FILE [--json]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aotc.errors import AotcError
from aotc.formats import fatbin, metallib

__all__ = ["InspectError", "inspect_file", "render_inspection"]


class InspectError(AotcError, ValueError):
    """The file cannot be read, is of an unknown kind, or is malformed."""


def inspect_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a ``.metallib`` or fatbin file as plain data (dispatching on its magic bytes)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InspectError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        if data[:4] == metallib.MAGIC:
            return _metallib_data(path, metallib.read_metallib(data))
        if data[:4] == fatbin.MAGIC.to_bytes(4, "little"):
            return _fatbin_data(path, fatbin.read_fatbin(data))
    except (metallib.MetallibError, fatbin.FatbinError) as e:
        raise InspectError(f"{path}: {e}") from None
    raise InspectError(
        f"{path}: not a Metal library (magic 'MTLB') or CUDA fatbin (magic 0xBA55ED50); "
        f"it starts with {data[:4].hex(' ') or 'nothing (empty file)'}"
    )


def _metallib_data(path: str | os.PathLike[str], lib: metallib.MetalLibrary) -> dict[str, Any]:
    return {
        "path": str(path),
        "format": "metallib",
        "size": lib.file_size,
        "format_version": lib.format_version,
        "file_type": lib.file_type,
        "platform": lib.platform,
        "platform_version": lib.platform_version,
        "target_triple": lib.target.triple if lib.target else None,
        "uuid": lib.uuid,
        "has_sources": lib.has_sources,
        "hash_mismatches": lib.verify_hashes(),
        "functions": [
            {
                "name": f.name,
                "type": f.type,
                "air_version": f.air_version,
                "msl_version": f.msl_version,
                "module_size": f.module_size,
                "constants": [
                    {"name": c.name, "type": c.type, "index": c.index} for c in f.constants
                ],
            }
            for f in lib.functions
        ],
    }


def _names(kernels: frozenset[str] | set[str] | None) -> list[str] | None:
    return None if kernels is None else sorted(kernels)


def _fatbin_data(path: str | os.PathLike[str], fb: fatbin.Fatbin) -> dict[str, Any]:
    return {
        "path": str(path),
        "format": "fatbin",
        "size": len(fb.data),
        "entries": [
            {
                "index": e.index,
                "kind": e.kind,
                "arch": e.arch,
                "version": e.version,
                "offset": e.offset,
                "size": e.size,
                "compressed": e.compressed,
                "uncompressed_size": e.uncompressed_size,
                "kernels": _names(e.kernels),
                "resources": _resources(e.resources),
            }
            for e in fb.entries
        ],
        "kernels_by_arch": {arch: _names(k) for arch, k in fb.kernels_by_arch().items()},
    }


RESOURCES_NOTE = "per thread; the stack holds calls' frames and spills"


def _resources(resources: dict[str, fatbin.KernelResources] | None) -> dict | None:
    if resources is None:
        return None
    return {
        name: {"registers": use.registers, "stack": use.stack}
        for name, use in sorted(resources.items())
    }


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart; the last column is not padded."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers) - 1)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
        for r in [headers, *rows]
    ]


def _render_metallib(d: dict[str, Any]) -> list[str]:
    mismatches = d["hash_mismatches"]
    lines = [
        f"{d['path']}: Metal library, {d['size']:,} bytes",
        f"  format {d['format_version']} {d['file_type']}, "
        f"platform {d['platform']} {d['platform_version']}, "
        f"target {d['target_triple'] or 'unknown'}",
        f"  functions: {len(d['functions'])}; module hashes: "
        + (f"{len(mismatches)} MISMATCHED" if mismatches else "all match")
        + ("; embeds sources" if d["has_sources"] else ""),
        *(f"  ! {m}" for m in mismatches),
        "",
    ]
    rows = [
        [
            f["name"],
            f["type"],
            f["air_version"],
            f["msl_version"],
            f"{f['module_size']:,}",
            ", ".join(f"{c['name']}: {c['type']} @{c['index']}" for c in f["constants"]),
        ]
        for f in d["functions"]
    ]
    headers = ["FUNCTION", "TYPE", "AIR", "MSL", "MODULE BYTES", "CONSTANTS"]
    return lines + ["  " + line for line in _table(headers, rows)]


def _render_fatbin(d: dict[str, Any]) -> list[str]:
    lines = [f"{d['path']}: CUDA fatbin, {d['size']:,} bytes, {len(d['entries'])} entries", ""]
    rows = [
        [
            str(e["index"]),
            e["kind"],
            e["arch"],
            e["version"],
            f"{e['size']:,}",
            f"yes, {e['uncompressed_size']:,} raw" if e["compressed"] else "no",
            "(compressed, unreadable here)" if e["kernels"] is None else ", ".join(e["kernels"]),
        ]
        for e in d["entries"]
    ]
    headers = ["#", "KIND", "ARCH", "VERSION", "BYTES", "COMPRESSED", "KERNELS"]
    lines += ["  " + line for line in _table(headers, rows)]
    for e in (e for e in d["entries"] if e["resources"]):
        lines += ["", f"  #{e['index']} {e['arch']}: {RESOURCES_NOTE}"]
        use = [[name, str(r["registers"]), str(r["stack"])] for name, r in e["resources"].items()]
        lines += ["  " + line for line in _table(["KERNEL", "REGISTERS", "STACK BYTES"], use)]
    return lines


def render_inspection(data: dict[str, Any]) -> str:
    """A readable report of ``inspect_file``'s result."""
    render = _render_metallib if data["format"] == "metallib" else _render_fatbin
    return "\n".join(render(data)) + "\n"
