"""Reader for CUDA fat binaries (``nvcc -fatbin`` / ``fatbinary --create``), and a way to cut
one kernel's image out of them.

Layout (little-endian), as written by CUDA 13's ``fatbinary``:

* a 16-byte container header: magic ``0xBA55ED50``, version (u16, 1), header size (u16, 16),
  size of everything after the header (u64);
* entries back to back, each a header followed by its payload:

  ======  ====  ==========================================================================
  offset  type  field
  ======  ====  ==========================================================================
  0       u16   kind: 1 = PTX, 2 = ELF (cubin)
  2       u16   (0x0101)
  4       u32   header size: 64, 80 (PTX) or 112 (sm_100+ cubins)
  8       u64   payload size, padded to 8 bytes
  16      u32   compressed size (0 when not compressed)
  24      u16   minor version of the payload (ELF 1.8, PTX 9.0)
  26      u16   major version
  28      u32   SM number, e.g. 90
  40      u64   flags: 0x1 64-bit, 0x2 debug, 0x10 Linux, 0x8000 compressed (zstd),
                0x100000 arch-specific ("sm_90a"), 0x200000 family-specific ("sm_100f")
  56      u64   uncompressed size (when compressed)
  ======  ====  ==========================================================================

CUDA 13 compresses PTX entries with zstd by default (``fatbinary --compress=true``); cubins
only with ``--compress-all``. Zstd payloads are decoded when the ``zstandard`` module is
installed; otherwise, and for the compressed payloads of older toolkits (flag 0x2000,
reportedly LZ4), their kernel names are reported as unknown (``None``).

A cubin's ``.nv.info`` section holds each function's register count and stack frame size
(``EIATTR_REGCOUNT`` and ``EIATTR_FRAME_SIZE``: records of format byte 4, attribute byte, u16
size, then the function's symbol index and the value, u32 each), which the entry reports per
kernel as ``resources``: what ``cuobjdump -res-usage`` prints as REG and STACK. A stack frame
beyond a call's few bytes means ptxas spilled registers.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "Fatbin",
    "FatbinEntry",
    "FatbinError",
    "KernelResources",
    "build_fatbin",
    "extract_image",
    "read_fatbin",
    "select_entry",
]

MAGIC = 0xBA55ED50
FLAG_COMPRESSED = 0x8000  # zstd, CUDA 13
FLAG_COMPRESSED_LZ4 = 0x2000  # older toolkits, reportedly LZ4
FLAG_ARCH_SPECIFIC = 0x100000
FLAG_FAMILY_SPECIFIC = 0x200000

_CONTAINER = struct.Struct("<IHHQ")
_ENTRY = struct.Struct("<HHIQI4xHHI8xQ8xQ")
_KINDS = {1: "ptx", 2: "elf"}
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_RATIO = 1024  # far above what compiled code compresses by

_ELF_HEADER = struct.Struct("<4sBB")
# From ELF header offset 0x28: e_shoff, then (at 0x3A) e_shentsize, e_shnum, e_shstrndx.
_ELF_SECTIONS = struct.Struct("<Q10xHHH")
_ELF_SECTION = struct.Struct("<II16xQQI")  # _Section's fields
_ELF_SYMBOL = struct.Struct("<IBBHQQ")
_SHT_SYMTAB, _STT_FUNC, _STO_CUDA_ENTRY = 2, 2, 0x10
_NV_INFO_RECORD = struct.Struct("<BBH")  # format, attribute, size (format 4) or value
_EIFMT_SVAL, _EIATTR_FRAME_SIZE, _EIATTR_REGCOUNT = 4, 0x11, 0x2F
_PTX_ENTRY = re.compile(rb"^[ \t]*(?:\.(?:visible|weak)[ \t]+)?\.entry[ \t]+([\w$%]+)", re.M)


class FatbinError(ValueError):
    """The data is not a well-formed fatbin, or holds no image for a request."""


class _Section(NamedTuple):
    name: int  # offset in the section-name string table
    type: int
    offset: int
    size: int
    link: int  # a symbol table's string table; .nv.info's symbol table


@dataclass(frozen=True)
class KernelResources:
    registers: int  # per thread
    stack: int  # bytes of stack frame per thread: spills and calls


@dataclass(frozen=True)
class FatbinEntry:
    index: int
    kind: str  # "elf" (cubin, SASS), "ptx", or "kind<N>" for kinds this reader does not know
    arch: str  # "sm_90a" for a cubin, "compute_90" for PTX
    sm: int  # 90
    variant: str  # "a" (arch-specific), "f" (family-specific) or ""
    offset: int  # of the entry header in the container
    header_size: int
    size: int  # stored payload size, padding included
    compressed: bool
    compressed_size: int | None  # of the zstd frame at the payload's start
    uncompressed_size: int | None
    version: str  # payload version: ELF "1.8", PTX ISA "9.0"
    flags: int
    kernels: frozenset[str] | None  # None: compressed and not decodable here
    # A cubin's kernels' registers and stack; None for PTX or a payload not decodable here.
    resources: dict[str, KernelResources] | None = field(default=None, compare=False)

    @property
    def payload_offset(self) -> int:
        return self.offset + self.header_size

    @property
    def end(self) -> int:
        return self.payload_offset + self.size


@dataclass(frozen=True)
class Fatbin:
    entries: tuple[FatbinEntry, ...]
    data: bytes = field(repr=False, compare=False)

    def kernels(self) -> set[str]:
        """Kernel names of every entry whose payload could be read."""
        return set().union(*(e.kernels for e in self.entries if e.kernels is not None))

    def archs(self) -> list[str]:
        """Distinct entry archs in file order, e.g. ``["sm_80", "sm_90a", "compute_90"]``."""
        return list(dict.fromkeys(e.arch for e in self.entries))

    def kernels_by_arch(self) -> dict[str, set[str] | None]:
        """Kernel names per arch; None for an arch whose entries cannot all be read."""
        result: dict[str, set[str] | None] = {}
        for e in self.entries:
            known = result.setdefault(e.arch, set())
            result[e.arch] = None if known is None or e.kernels is None else known | e.kernels
        return result

    def payload(self, entry: FatbinEntry) -> bytes:
        """The entry's payload, decompressed; FatbinError if no decoder is installed."""
        if not entry.compressed:
            return _raw_payload(self.data, entry)
        decoded = _decompress(self.data, entry)
        if decoded is None:
            raise FatbinError(
                f"offset {entry.payload_offset}: entry #{entry.index} is compressed and cannot "
                "be decoded here (zstd needs `pip install zstandard`; LZ4 is not supported)"
            )
        return decoded


def _fail(offset: int, message: str) -> FatbinError:
    return FatbinError(f"offset {offset}: {message}")


def _raw_payload(data: bytes, entry: FatbinEntry) -> bytes:
    size = entry.size if entry.compressed_size is None else entry.compressed_size
    return data[entry.payload_offset : entry.payload_offset + size]


def _decompress(data: bytes, entry: FatbinEntry) -> bytes | None:
    """The entry's zstd payload decoded; None for other codecs or without a decoder."""
    frame, size = _raw_payload(data, entry), entry.uncompressed_size or 0
    if not frame.startswith(_ZSTD_MAGIC):
        return None
    try:
        import zstandard
    except ImportError:
        return None
    # Bound the output by the header's claim, itself bounded, so no frame can exhaust memory.
    if size > _MAX_RATIO * len(frame) + (1 << 20):
        raise _fail(
            entry.offset + 56, f"implausible uncompressed size {size} for {len(frame)} bytes"
        )
    try:
        out = zstandard.ZstdDecompressor().stream_reader(frame).read(size + 1)
    except zstandard.ZstdError as e:
        raise _fail(entry.payload_offset, f"corrupt zstd payload ({e})") from None
    if len(out) != size:
        raise _fail(entry.offset + 56, f"the header says {size} bytes, zstd gives {len(out)}")
    return out


class _Elf:
    """A cubin's section headers and symbols, bounds-checked; ``base`` is its offset in the
    container, for error messages."""

    def __init__(self, elf: bytes, base: int) -> None:
        self.elf, self.base = elf, base
        self.need(0, 64, "an ELF header")
        magic, elf_class, encoding = _ELF_HEADER.unpack_from(elf)
        if (magic, elf_class, encoding) != (b"\x7fELF", 2, 1):
            raise _fail(base, "expected a 64-bit little-endian ELF cubin")
        shoff, shentsize, shnum, shstrndx = _ELF_SECTIONS.unpack_from(elf, 0x28)
        if shentsize < _ELF_SECTION.size and shnum:
            raise _fail(base + 0x3A, f"ELF section header size {shentsize} is too small")
        self.need(shoff, shnum * shentsize, f"{shnum} ELF section headers")
        self.sections = [
            _Section(*_ELF_SECTION.unpack_from(elf, shoff + i * shentsize)) for i in range(shnum)
        ]
        self.shstrndx = shstrndx
        self._symbols: dict[int, list[tuple[str, int, int]]] = {}

    def need(self, offset: int, size: int, what: str) -> None:
        if offset < 0 or size < 0 or offset + size > len(self.elf):
            raise _fail(
                self.base + offset,
                f"expected {what} ({size} bytes) inside the cubin, which ends at offset "
                f"{self.base + len(self.elf)}",
            )

    def body(self, index: int, what: str) -> tuple[int, bytes]:
        """(offset, bytes) of section ``index``."""
        if index >= len(self.sections):
            raise _fail(self.base, f"{what} is missing section {index}")
        offset, size = self.sections[index].offset, self.sections[index].size
        self.need(offset, size, what)
        return offset, self.elf[offset : offset + size]

    def string(self, table: bytes, at: int, where: int) -> str:
        end = table.find(b"\0", at)
        if at >= len(table) or end < 0:
            raise _fail(self.base + where, "a name is outside its ELF string table")
        return table[at:end].decode("utf-8", "replace")

    def section_named(self, name: str) -> int | None:
        if self.shstrndx >= len(self.sections):
            return None
        _, names = self.body(self.shstrndx, "the ELF section names")
        for index, section in enumerate(self.sections):
            if names.find(name.encode() + b"\0", section.name) == section.name:
                return index
        return None

    def symbols(self, symtab: int) -> list[tuple[str, int, int]]:
        """(name, info, other) of each symbol of symbol table section ``symtab``, read once."""
        if symtab not in self._symbols:
            self._symbols[symtab] = self._read_symbols(symtab)
        return self._symbols[symtab]

    def _read_symbols(self, symtab: int) -> list[tuple[str, int, int]]:
        offset, table = self.body(symtab, "the ELF symbol table")
        _, strings = self.body(self.sections[symtab].link, "the ELF string table")
        result = []
        for pos in range(0, len(table) - _ELF_SYMBOL.size + 1, _ELF_SYMBOL.size):
            name, info, other, *_ = _ELF_SYMBOL.unpack_from(table, pos)
            result.append((self.string(strings, name, offset + pos), info, other))
        return result


def _read_elf(elf: bytes, base: int) -> tuple[frozenset[str], dict[str, KernelResources]]:
    """Kernel entry points of a cubin (FUNC symbols marked STO_CUDA_ENTRY in its symtab) and
    their registers and stack frames from its ``.nv.info`` section."""
    cubin = _Elf(elf, base)
    kernels: set[str] = set()
    for index, section in enumerate(cubin.sections):
        if section.type == _SHT_SYMTAB:
            kernels.update(
                name
                for name, info, other in cubin.symbols(index)
                if info & 0xF == _STT_FUNC and other & _STO_CUDA_ENTRY
            )
    return frozenset(kernels), _nv_info_resources(cubin, kernels)


def _nv_info_resources(cubin: _Elf, kernels: set[str]) -> dict[str, KernelResources]:
    info = cubin.section_named(".nv.info")
    if info is None:
        return {}
    offset, records = cubin.body(info, "the .nv.info section")
    names = [name for name, *_ in cubin.symbols(cubin.sections[info].link)]
    found: dict[str, dict[int, int]] = {}
    pos = 0
    while pos + _NV_INFO_RECORD.size <= len(records):
        fmt, attribute, size = _NV_INFO_RECORD.unpack_from(records, pos)
        pos += _NV_INFO_RECORD.size
        if fmt != _EIFMT_SVAL:
            continue  # the value sat in the size field
        if pos + size > len(records):
            raise _fail(cubin.base + offset + pos, f".nv.info record of {size} bytes runs past it")
        if attribute in (_EIATTR_REGCOUNT, _EIATTR_FRAME_SIZE) and size == 8:
            symbol, value = struct.unpack_from("<II", records, pos)
            if symbol >= len(names):
                raise _fail(cubin.base + offset + pos, f".nv.info names missing symbol {symbol}")
            found.setdefault(names[symbol], {})[attribute] = value
        pos += size
    return {
        name: KernelResources(values[_EIATTR_REGCOUNT], values.get(_EIATTR_FRAME_SIZE, 0))
        for name, values in found.items()
        if name in kernels and _EIATTR_REGCOUNT in values
    }


def _ptx_kernels(ptx: bytes) -> frozenset[str]:
    return frozenset(m.decode("ascii", "replace") for m in _PTX_ENTRY.findall(ptx))


def _read_entry(data: bytes, index: int, offset: int, end: int) -> FatbinEntry:
    if end - offset < _ENTRY.size:
        raise _fail(offset, f"expected a {_ENTRY.size}-byte entry header before offset {end}")
    kind, _, header_size, size, csize, minor, major, sm, flags, usize = _ENTRY.unpack_from(
        data, offset
    )
    if header_size < _ENTRY.size:
        raise _fail(offset + 4, f"entry header size {header_size} is below {_ENTRY.size}")
    if header_size + size > end - offset:
        raise _fail(
            offset + 8,
            f"entry #{index} ({header_size}-byte header, {size}-byte payload) runs past the "
            f"container's end at offset {end}",
        )
    compressed = bool(flags & (FLAG_COMPRESSED | FLAG_COMPRESSED_LZ4))
    if compressed and csize > size:
        raise _fail(offset + 16, f"compressed size {csize} exceeds the payload size {size}")
    variant = "a" if flags & FLAG_ARCH_SPECIFIC else "f" if flags & FLAG_FAMILY_SPECIFIC else ""
    kind_name = _KINDS.get(kind, f"kind{kind}")
    prefix = "compute" if kind_name == "ptx" else "sm"
    entry = FatbinEntry(
        index=index,
        kind=kind_name,
        arch=f"{prefix}_{sm}{variant}",
        sm=sm,
        variant=variant,
        offset=offset,
        header_size=header_size,
        size=size,
        compressed=compressed,
        compressed_size=csize if compressed else None,
        uncompressed_size=usize if compressed else None,
        version=f"{major}.{minor}",
        flags=flags,
        kernels=None,
    )
    return _read_payload(data, entry)


def _read_payload(data: bytes, entry: FatbinEntry) -> FatbinEntry:
    """The entry with what its payload says: kernel names, and a cubin's kernels' resources."""
    if entry.kind not in ("elf", "ptx"):
        return replace(entry, kernels=frozenset())
    payload = _decompress(data, entry) if entry.compressed else _raw_payload(data, entry)
    if payload is None:
        return entry
    if entry.kind == "ptx":
        return replace(entry, kernels=_ptx_kernels(payload))
    # A decompressed cubin has no container offset; report its errors at the payload start.
    kernels, resources = _read_elf(payload, entry.payload_offset)
    return replace(entry, kernels=kernels, resources=resources)


def read_fatbin(source: str | os.PathLike[str] | bytes | bytearray | memoryview) -> Fatbin:
    """Parse a fatbin container from a path or its bytes.

    Raises FatbinError for malformed data (OSError only for a path that cannot be read).
    """
    data = Path(source).read_bytes() if isinstance(source, str | os.PathLike) else bytes(source)
    if len(data) < _CONTAINER.size:
        raise _fail(0, f"expected a {_CONTAINER.size}-byte fatbin header, got {len(data)} bytes")
    magic, version, header_size, size = _CONTAINER.unpack_from(data)
    if magic != MAGIC:
        raise _fail(0, f"expected fatbin magic {MAGIC:#010x}, found {magic:#010x}")
    if version != 1 or header_size < _CONTAINER.size:
        raise _fail(4, f"unsupported fatbin version {version} / header size {header_size}")
    if header_size + size != len(data):
        raise _fail(
            8, f"header and payload sizes give {header_size + size} bytes, the data has {len(data)}"
        )
    entries, offset = [], header_size
    while offset < len(data):
        entry = _read_entry(data, len(entries), offset, len(data))
        entries.append(entry)
        offset = entry.end
    return Fatbin(tuple(entries), data)


def _device_sm(arch: str | int) -> int:
    m = re.fullmatch(r"(?:sm_|compute_)?(\d+)[af]?", str(arch))
    if not m:
        raise FatbinError(f"cannot read a device arch from {arch!r} (expected e.g. 'sm_90')")
    return int(m.group(1))


_VARIANT_RANK = {"a": 2, "f": 1, "": 0}


def select_entry(fatbin: Fatbin, kernel: str, arch: str | int) -> FatbinEntry:
    """The entry to load ``kernel`` from on a device of compute capability ``arch``.

    Rule: a cubin (SASS) built for exactly the device's SM number (preferring "a", then "f",
    then plain builds, all of which run on that exact device); else the PTX of the highest
    compute capability not above the device's, arch- or family-specific PTX ("compute_90a")
    counting only for the device's own SM number. Among equals, the first entry wins.
    """
    sm = _device_sm(arch)
    holders = [e for e in fatbin.entries if e.kernels is not None and kernel in e.kernels]
    sass = [e for e in holders if e.kind == "elf" and e.sm == sm]
    ptx = [e for e in holders if e.kind == "ptx" and (e.sm == sm or (e.sm < sm and not e.variant))]
    if sass:
        return max(sass, key=lambda e: (_VARIANT_RANK[e.variant], -e.index))
    if ptx:
        return max(ptx, key=lambda e: (e.sm, _VARIANT_RANK[e.variant], -e.index))
    raise FatbinError(_no_match(fatbin, kernel, sm, holders))


def _no_match(fatbin: Fatbin, kernel: str, sm: int, holders: list[FatbinEntry]) -> str:
    where = ", ".join(dict.fromkeys(e.arch for e in holders)) or "no entry"
    unknown = list(dict.fromkeys(e.arch for e in fatbin.entries if e.kernels is None))
    note = f"; entries {', '.join(unknown)} could not be read (compressed)" if unknown else ""
    return f"no image of kernel {kernel!r} can run on sm_{sm}: it is in {where}{note}"


def build_fatbin(data: bytes, entries: Iterable[FatbinEntry]) -> bytes:
    """A new container holding ``entries`` of the fatbin ``data``, copied byte for byte."""
    body = b"".join(data[e.offset : e.end] for e in entries)
    return _CONTAINER.pack(MAGIC, 1, _CONTAINER.size, len(body)) + body


def extract_image(fatbin: bytes | Fatbin, kernel: str, arch: str | int) -> bytes:
    """A minimal fatbin holding only the entry that ``select_entry`` picks for ``kernel``.

    Small images matter: MLX hashes the whole image on every evaluation.
    """
    parsed = fatbin if isinstance(fatbin, Fatbin) else read_fatbin(fatbin)
    return build_fatbin(parsed.data, [select_entry(parsed, kernel, arch)])
