"""Reader for Apple Metal library archives (``.metallib``).

Layout (all integers little-endian), as observed in files written by Apple's toolchain:

* an 88-byte header: ``MTLB``; format version (3 x u16, the top bit of the major marks a macOS
  library); file type (u8, top bit: stub); platform (u8, top bit: 64-bit); platform version
  (u16 major, u8 minor, u8 patch); file size (u64); then (offset, size) u64 pairs of the
  function list, public metadata, private metadata and module sections;
* the function list: a u32 count, then per function a tag group. A tag group is a u32 size
  followed by tags (4-byte name, u16 value size, value) and ends with the tag ``ENDT``;
* an optional header extension (tags without a size field, ending with ``ENDT``) between the
  function list and the public metadata, with the absolute (offset, size) of later sections;
* per function, one public and one private metadata tag group and one module (an LLVM bitcode
  wrapper), located by the function's ``OFFT`` tag relative to the start of each section.

Group sizes differ between writers (some count the size field itself, some do not), so group
ends are found by ``ENDT`` and only the section bounds are trusted.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

__all__ = [
    "FunctionConstant",
    "MetalFunction",
    "MetalLibrary",
    "MetallibError",
    "TargetTriple",
    "bitcode_triple",
    "read_metallib",
]

MAGIC = b"MTLB"
HEADER_SIZE = 88


class MetallibError(ValueError):
    """The data is not a well-formed Metal library; the message names the byte offset."""


# Values from Metal.jl / MetalLibraryArchive (FILE_*, PROGRAM_*) and LLVM's MachO.def (PLATFORM_*).
_FILE_TYPES = {0: "executable", 1: "coreimage", 2: "dynamic", 3: "symbolcompanion"}
_FUNCTION_TYPES = {
    0: "vertex",
    1: "fragment",
    2: "kernel",
    3: "unqualified",
    4: "visible",
    5: "extern",
    6: "intersection",
    255: "none",
}
_PLATFORMS = {
    0: "unknown",
    1: "macOS",
    2: "iOS",
    3: "tvOS",
    4: "watchOS",
    5: "bridgeOS",
    6: "macCatalyst",
    7: "iOS Simulator",
    8: "tvOS Simulator",
    9: "watchOS Simulator",
    10: "DriverKit",
    11: "visionOS",
    12: "visionOS Simulator",
}


def _data_types() -> dict[int, str]:
    """MTLDataType codes of scalars, vectors and matrices (the types a function constant has)."""
    names = {0: "none", 1: "struct", 2: "array", 0x3A: "texture", 0x3B: "sampler", 0x3C: "pointer"}
    families = [
        ("float", 0x03, True),
        ("half", 0x10, True),
        ("int", 0x1D, False),
        ("uint", 0x21, False),
        ("short", 0x25, False),
        ("ushort", 0x29, False),
        ("char", 0x2D, False),
        ("uchar", 0x31, False),
        ("bool", 0x35, False),
        ("long", 0x51, False),
        ("ulong", 0x55, False),
        ("double", 0x59, False),
        ("bfloat", 0x79, False),
    ]
    for base, first, has_matrices in families:
        for i, suffix in enumerate(["", "2", "3", "4"]):
            names[first + i] = base + suffix
        if has_matrices:
            shapes = [f"{c}x{r}" for c in "234" for r in "234"]
            names.update({first + 4 + i: base + s for i, s in enumerate(shapes)})
    return names


_DATA_TYPES = _data_types()
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4s3HBBHBBQ8Q")
_EXTENSION_SECTIONS = {"HSRC", "HSRD", "HDYN", "RLST", "VLST", "ILST", "SLST"}


@dataclass(frozen=True)
class FunctionConstant:
    """A function constant from the ``CNST`` tag of a function's public metadata."""

    name: str
    type: str  # Metal type name, e.g. "float", "uint2"; "type_0xNN" when unknown
    index: int


@dataclass(frozen=True)
class MetalFunction:
    name: str
    type: str  # "kernel", "vertex", "fragment", ...
    air_version: str
    msl_version: str
    module_offset: int  # absolute offset of the function's module in the file
    module_size: int
    hash: str  # hex SHA-256 the file records for the module
    constants: tuple[FunctionConstant, ...]


@dataclass(frozen=True)
class TargetTriple:
    """The LLVM target triple of a module, e.g. ``air64_v26-apple-macosx14.0.0``."""

    triple: str
    arch: str  # "air64", "air64_v26", ...
    vendor: str
    os: str  # "macosx", "ios", ...
    os_version: str  # deployment target, e.g. "14.0.0"

    @classmethod
    def parse(cls, triple: str) -> TargetTriple | None:
        m = re.fullmatch(r"([^-]+)-([^-]+)-([a-z]+)([0-9.]*)(?:-.*)?", triple)
        return cls(triple, *m.groups()) if m else None


@dataclass(frozen=True)
class MetalLibrary:
    format_version: str  # e.g. "1.2.7"
    file_type: str  # "executable", "dynamic", ...
    stub: bool
    platform: str  # "macOS", "iOS", ... or "unknown" (formats before 1.2.6 leave it zero)
    platform_version: str  # e.g. "14.0.0"
    file_size: int
    uuid: str | None
    extensions: dict[str, tuple[int, int]]  # header-extension tag -> (offset, size)
    target: TargetTriple | None  # from the first module's bitcode, when it can be read
    functions: tuple[MetalFunction, ...]
    data: bytes = field(repr=False, compare=False)

    @cached_property
    def _by_name(self) -> dict[str, MetalFunction]:
        return {f.name: f for f in self.functions}

    def function(self, name: str) -> MetalFunction:
        """The function called ``name``; ``KeyError`` when absent."""
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def has_sources(self) -> bool:
        return "HSRC" in self.extensions or "HSRD" in self.extensions

    def module(self, function: MetalFunction) -> memoryview:
        """The module (bitcode wrapper) bytes of ``function``, without copying."""
        return memoryview(self.data)[
            function.module_offset : function.module_offset + function.module_size
        ]

    def verify_hashes(self, functions: Iterable[MetalFunction] | None = None) -> list[str]:
        """Compare each function's recorded ``HASH`` with the SHA-256 of its module.

        Returns one line per mismatch (empty when all match); checks all functions by default.
        """
        problems = []
        for f in self.functions if functions is None else functions:
            actual = hashlib.sha256(self.module(f)).hexdigest()
            if actual != f.hash:
                problems.append(
                    f"{f.name}: module at offset {f.module_offset} ({f.module_size} bytes) "
                    f"has SHA-256 {actual}, the function list records {f.hash}"
                )
        return problems


class _Cursor:
    """Bounds-checked little-endian reads of ``data[pos:end]``; ``region`` names it in errors."""

    __slots__ = ("data", "end", "pos", "region")

    def __init__(self, data: bytes, pos: int, end: int, region: str) -> None:
        self.data, self.pos, self.end, self.region = data, pos, end, region

    def take(self, n: int, what: str) -> int:
        """Advance over ``n`` bytes and return where they start."""
        start = self.pos
        if n > self.end - start:
            raise MetallibError(
                f"offset {start}: expected {what} ({n} bytes), but {self.region} "
                f"ends at offset {self.end}"
            )
        self.pos = start + n
        return start

    def u8(self, what: str) -> int:
        return self.data[self.take(1, what)]

    def u16(self, what: str) -> int:
        return _U16.unpack_from(self.data, self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.data, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.data, self.take(8, what))[0]

    def raw(self, n: int, what: str) -> bytes:
        start = self.take(n, what)
        return self.data[start : start + n]

    def cstr(self, what: str) -> str:
        nul = self.data.find(b"\0", self.pos, self.end)
        if nul < 0:
            raise MetallibError(
                f"offset {self.pos}: expected {what} ending in a NUL byte before the end of "
                f"{self.region} at offset {self.end}"
            )
        start = self.take(nul + 1 - self.pos, what)
        try:
            return self.data[start:nul].decode()
        except UnicodeDecodeError as e:
            raise MetallibError(f"offset {start}: {what} is not UTF-8 ({e.reason})") from None

    def sub(self, start: int, size: int, region: str) -> _Cursor:
        """A cursor over ``[start, start + size)``, which must lie inside this one."""
        if not (self.pos <= start <= self.end and size <= self.end - start):
            raise MetallibError(
                f"offset {start}: {region} ({size} bytes) does not fit in {self.region} "
                f"[{self.pos}, {self.end})"
            )
        return _Cursor(self.data, start, start + size, region)


def _tags(cur: _Cursor, group: str) -> Iterator[tuple[str, _Cursor]]:
    """Yield (name, value cursor) for each tag up to ``ENDT``.

    This loop runs for every tag of every function (150k in MLX's library), hence the inlined
    reads; the slower, message-building ``take`` only runs to report a problem.
    """
    data, end = cur.data, cur.end
    while True:
        pos = cur.pos
        if end - pos >= 4 and data[pos : pos + 4] == b"ENDT":
            cur.pos = pos + 4
            return
        if end - pos < 6:
            cur.take(6, f"a tag (4-byte name, 2-byte size) or ENDT in {group}")
        name = data[pos : pos + 4].decode("latin-1")
        start = pos + 6
        size = _U16.unpack_from(data, pos + 4)[0]
        cur.pos = start
        if size > end - start:
            cur.take(size, f"the value of tag {name!a} in {group}")
        cur.pos = start + size
        yield name, _Cursor(data, start, start + size, f"the value of tag {name!a}")


def _group(cur: _Cursor, group: str) -> dict[str, _Cursor]:
    """Read a sized tag group; its size field is skipped since writers disagree on its meaning."""
    cur.take(4, f"the size field of {group}")
    return dict(_tags(cur, group))


def _require(tags: dict[str, _Cursor], name: str, group: str, at: int) -> _Cursor:
    if name not in tags:
        raise MetallibError(f"offset {at}: {group} has no {name} tag")
    return tags[name]


def _read_function(cur: _Cursor, index: int, public: _Cursor, modules: _Cursor) -> MetalFunction:
    at = cur.pos
    group = f"function #{index} (tag group at offset {at})"
    tags = _group(cur, group)
    name = _require(tags, "NAME", group, at).cstr("the function name")
    group = f"function {name!r} (tag group at offset {at})"
    type_code = _require(tags, "TYPE", group, at).u8("the function type")
    digest = _require(tags, "HASH", group, at).raw(32, "a SHA-256 digest")
    offsets = _require(tags, "OFFT", group, at)
    public_offset = offsets.u64("the public metadata offset")
    offsets.u64("the private metadata offset")
    module_offset = offsets.u64("the module offset")
    vers = _require(tags, "VERS", group, at)
    air = f"{vers.u16('the AIR major version')}.{vers.u16('the AIR minor version')}"
    msl = f"{vers.u16('the MSL major version')}.{vers.u16('the MSL minor version')}"
    module_size = _require(tags, "MDSZ", group, at).u64("the module size")
    module = modules.sub(modules.pos + module_offset, module_size, f"the module of {name!r}")
    return MetalFunction(
        name=name,
        type=_FUNCTION_TYPES.get(type_code, f"unknown({type_code})"),
        air_version=air,
        msl_version=msl,
        module_offset=module.pos,
        module_size=module_size,
        hash=digest.hex(),
        constants=_read_constants(public, public_offset, name),
    )


def _read_constants(public: _Cursor, offset: int, name: str) -> tuple[FunctionConstant, ...]:
    region = f"the public metadata of {name!r}"
    cur = public.sub(public.pos + offset, public.end - public.pos - offset, region)
    cnst = _group(cur, region).get("CNST")
    if cnst is None:
        return ()
    count = cnst.u16("the function constant count")
    constants = []
    for _ in range(count):
        const_name = cnst.cstr("a function constant name")
        type_code = cnst.u8("a function constant type")
        index = cnst.u16("a function constant index")
        cnst.u8("a function constant's active flag")
        dtype = _DATA_TYPES.get(type_code, f"type_{type_code:#04x}")
        constants.append(FunctionConstant(const_name, dtype, index))
    return tuple(constants)


def _read_extension(cur: _Cursor, file: _Cursor) -> tuple[str | None, dict[str, tuple[int, int]]]:
    """Header extension tags: the UUID and the (offset, size) of the sections they locate."""
    uuid, sections = None, {}
    for name, value in _tags(cur, "the header extension"):
        if name == "UUID":
            uuid = value.raw(16, "a UUID").hex()
        elif name in _EXTENSION_SECTIONS:
            offset, size = value.u64(f"the {name} offset"), value.u64(f"the {name} size")
            file.sub(offset, size, f"the {name} section")
            sections[name] = (offset, size)
    return uuid, sections


def _version(major: int, minor: int, patch: int) -> str:
    return f"{major}.{minor}.{patch}"


def read_metallib(source: str | os.PathLike[str] | bytes | bytearray | memoryview) -> MetalLibrary:
    """Parse a Metal library from a path or its bytes.

    Raises ``MetallibError`` for data that is not a well-formed library (``OSError`` only for a
    path that cannot be read).
    """
    data = Path(source).read_bytes() if isinstance(source, str | os.PathLike) else bytes(source)
    file = _Cursor(data, 0, len(data), "the file")
    if data[:4] != MAGIC:
        raise MetallibError(f"offset 0: expected magic {MAGIC!r}, found {data[:4]!r}")
    file.take(HEADER_SIZE, "the header")
    (_, major, minor, patch, ftype, plat, plat_major, plat_minor, plat_patch, size, *sections) = (
        _HEADER.unpack_from(data)
    )
    if size != len(data):
        raise MetallibError(f"offset 16: the header gives a file size of {size}, not {len(data)}")
    names = ["function list", "public metadata", "private metadata", "module"]
    regions = [
        file.sub(off, sz + (4 if i == 0 else 0), f"the {names[i]} section")  # + count field
        for i, (off, sz) in enumerate(zip(sections[::2], sections[1::2], strict=True))
    ]
    flist, public, _, modules = regions
    count = flist.u32("the function count")
    if count * 8 > flist.end - flist.pos:  # a group is at least a size field and ENDT
        raise MetallibError(f"offset {flist.pos - 4}: {count} functions cannot fit the list")
    functions = tuple(_read_function(flist, i, public, modules) for i in range(count))
    uuid, extensions = None, {}
    if flist.pos < public.pos:
        extension = file.sub(flist.pos, public.pos - flist.pos, "the header extension")
        uuid, extensions = _read_extension(extension, file)
    first = functions[0] if functions else None
    triple = None
    if first:
        end = first.module_offset + first.module_size
        triple = bitcode_triple(memoryview(data)[first.module_offset : end])
    return MetalLibrary(
        format_version=_version(major & 0x7FFF, minor, patch),
        file_type=_FILE_TYPES.get(ftype & 0x7F, f"unknown({ftype & 0x7F})"),
        stub=bool(ftype & 0x80),
        platform=_PLATFORMS.get(plat & 0x7F, f"unknown({plat & 0x7F})"),
        platform_version=_version(plat_major, plat_minor, plat_patch),
        file_size=size,
        uuid=uuid,
        extensions=extensions,
        target=TargetTriple.parse(triple) if triple else None,
        functions=functions,
        data=data,
    )


# --- LLVM bitcode: just enough of the bitstream to read the target triple ---------------------
#
# The triple is read from the module's irsymtab (SYMTAB_BLOCK, whose header holds the triple as
# an (offset, size) string reference at byte 44) and its string table (STRTAB_BLOCK): both are
# top-level blocks holding one blob each, so the MODULE_BLOCK itself never has to be decoded.

_WRAPPER_MAGIC = 0x0B17C0DE
_BITCODE_MAGIC = b"BC\xc0\xde"
_STRTAB_BLOCK, _SYMTAB_BLOCK = 23, 25
_SYMTAB_TRIPLE = 44


class _BitcodeError(Exception):
    pass


class _Bits:
    """LSB-first bit reader over ``data[start:end]`` (positions in bits).

    ``budget`` caps the number of reads so that hostile bitcode cannot make parsing slow.
    """

    def __init__(self, data: memoryview, pos: int, end: int) -> None:
        self.data, self.pos, self.end, self.budget = data, pos, end, 1_000_000

    def fixed(self, n: int) -> int:
        self.budget -= 1
        if n > 64 or self.pos + n > self.end or self.budget < 0:
            raise _BitcodeError
        shift, first = self.pos & 7, self.pos >> 3
        chunk = self.data[first : (self.pos + n + 7) >> 3]
        self.pos += n
        return (int.from_bytes(chunk, "little") >> shift) & ((1 << n) - 1)

    def vbr(self, n: int) -> int:
        if n < 2:
            raise _BitcodeError
        value, shift, high = 0, 0, 1 << (n - 1)
        while True:
            piece = self.fixed(n)
            value |= (piece & (high - 1)) << shift
            if not piece & high:
                return value
            shift += n - 1
            if shift > 64:
                raise _BitcodeError

    def align32(self) -> None:
        self.pos = min(self.end, (self.pos + 31) & ~31)

    def skip_bytes(self, n: int) -> int:
        """Skip ``n`` bytes at a byte-aligned position and return their byte offset."""
        start = self.pos >> 3
        if self.pos + 8 * n > self.end:
            raise _BitcodeError
        self.pos += 8 * n
        return start


_Abbrev = list[tuple[str, int]]  # (operand kind, width or literal value)


def _define_abbrev(bits: _Bits) -> _Abbrev:
    ops: _Abbrev = []
    for _ in range(bits.vbr(5)):
        if bits.fixed(1):
            ops.append(("literal", bits.vbr(8)))
            continue
        kind = {1: "fixed", 2: "vbr", 3: "array", 4: "char6", 5: "blob"}.get(bits.fixed(3))
        if kind is None:
            raise _BitcodeError
        ops.append((kind, bits.vbr(5) if kind in ("fixed", "vbr") else 0))
    return ops


def _scalar(bits: _Bits, kind: str, arg: int) -> int:
    if kind == "literal":
        return arg
    if kind == "fixed":
        return bits.fixed(arg)
    if kind == "vbr":
        return bits.vbr(arg)
    if kind == "char6":
        return bits.fixed(6)
    raise _BitcodeError


def _abbreviated_blob(bits: _Bits, ops: _Abbrev) -> memoryview | None:
    """Read one record by its abbreviation; return its blob operand, if any."""
    i = 0
    while i < len(ops):
        kind, arg = ops[i]
        if kind == "array":
            # Elements must consume bits, or a huge count would loop without reading anything.
            if i + 1 >= len(ops) or ops[i + 1][0] not in ("fixed", "vbr", "char6"):
                raise _BitcodeError
            if ops[i + 1] == ("fixed", 0):
                raise _BitcodeError
            for _ in range(bits.vbr(6)):
                _scalar(bits, *ops[i + 1])
            i += 2
            continue
        if kind == "blob":
            size = bits.vbr(6)
            bits.align32()
            start = bits.skip_bytes(size)
            bits.align32()
            return bits.data[start : start + size]
        _scalar(bits, kind, arg)
        i += 1
    return None


def _block_blob(bits: _Bits, width: int) -> memoryview | None:
    """The first blob record in the block at ``bits`` (abbreviation id width ``width``)."""
    abbrevs: list[_Abbrev] = []
    while bits.pos < bits.end:
        abbrev_id = bits.fixed(width)
        if abbrev_id == 0:  # END_BLOCK
            return None
        if abbrev_id == 1:  # a nested block: skip it whole
            bits.vbr(8)
            bits.vbr(4)
            bits.align32()
            bits.skip_bytes(4 * bits.fixed(32))
        elif abbrev_id == 2:
            abbrevs.append(_define_abbrev(bits))
        elif abbrev_id == 3:  # unabbreviated record: code, operand count, operands
            bits.vbr(6)
            for _ in range(bits.vbr(6)):
                bits.vbr(6)
        elif abbrev_id - 4 < len(abbrevs):
            blob = _abbreviated_blob(bits, abbrevs[abbrev_id - 4])
            if blob is not None:
                return blob
        else:
            raise _BitcodeError
    return None


def _top_level_blobs(bitcode: memoryview) -> dict[int, memoryview]:
    """Blobs of the top-level STRTAB and SYMTAB blocks, skipping every other block."""
    bits = _Bits(bitcode, 32, 8 * len(bitcode))
    blobs: dict[int, memoryview] = {}
    while bits.end - bits.pos >= 32 and bits.fixed(2) == 1:  # ENTER_SUBBLOCK
        block_id, width = bits.vbr(8), bits.vbr(4)
        bits.align32()
        nbytes = 4 * bits.fixed(32)
        body = bits.skip_bytes(nbytes)
        if block_id in (_STRTAB_BLOCK, _SYMTAB_BLOCK):
            blob = _block_blob(_Bits(bitcode, 8 * body, 8 * (body + nbytes)), width)
            if blob is not None:
                blobs[block_id] = blob
    return blobs


def bitcode_triple(module: memoryview | bytes) -> str | None:
    """The target triple recorded in a (wrapped) LLVM bitcode module, or None if unreadable."""
    view = memoryview(module)
    try:
        if len(view) >= 20 and _U32.unpack_from(view)[0] == _WRAPPER_MAGIC:
            offset, size = _U32.unpack_from(view, 8)[0], _U32.unpack_from(view, 12)[0]
            view = view[offset : offset + size]
        if bytes(view[:4]) != _BITCODE_MAGIC:
            return None
        blobs = _top_level_blobs(view)
        symtab, strtab = blobs.get(_SYMTAB_BLOCK), blobs.get(_STRTAB_BLOCK)
        if symtab is None or strtab is None or len(symtab) < _SYMTAB_TRIPLE + 8:
            return None
        offset, size = struct.unpack_from("<II", symtab, _SYMTAB_TRIPLE)
        if offset + size > len(strtab):
            return None
        return bytes(strtab[offset : offset + size]).decode("ascii")
    except (_BitcodeError, UnicodeDecodeError):
        return None
