"""The registry of prebuilt aotc libraries: where they are found, and whether they fit here.

A library is one index (`<library>.<target>.json`) with its artifact beside it. They are found,
with no compiler and no network, in this order (the search order):

1. explicit `aotc.load(path)` calls, in call order. `path` is an index, an artifact with its index
   beside it (`x.fatbin` -> `x.cuda.json`, `x.metallib` -> `x.metal.json`), or a folder of indexes;
2. `AOTC_PATH`: entries separated by `os.pathsep`, each a file or a folder as for `aotc.load()`;
3. entry points of the group `aotc.libraries` (installed wheels), sorted by distribution name, then
   entry-point name. The value is a package (`aotc_lib_x`: its folder holds the indexes) or
   `module:attr` whose value is a folder path (or a callable returning one);
4. resources of a frozen or bundled app, in this order:
   - PyInstaller: `sys._MEIPASS/aotc` (when `sys.frozen`);
   - other freezers (cx_Freeze, Nuitka standalone): `aotc/` beside `sys.executable` when
     `sys.frozen`;
   - a macOS app: `<X>.app/Contents/Resources/aotc`, the `.app` found above `sys.executable`;
   - py2app: `$RESOURCEPATH/aotc`;
   - Briefcase-style apps: `<package>/resources/aotc` of the package run as `__main__`
     (`python -m <package>`, which is how Briefcase starts an app).

A folder holds indexes named `<library>.<target>.json` (target: `cuda`, `metal`); other files are
ignored. A library found twice (the same index file) is listed once, at its first place. When
several libraries provide the same kernel, the first *usable* one in this order serves it.

A library is listed even when it cannot be used on this machine; `Library.problems` says why
(no such GPU backend in this MLX, another MLX version or other MLX Metal headers than at build
time, a missing artifact). The artifact's checksum is checked when it is first read.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib import import_module
from pathlib import Path
from typing import Any

from aotc.artifact import BadIndex, Index, read_index

log = logging.getLogger("aotc")

ENTRY_POINT_GROUP = "aotc.libraries"
ENV_PATH = "AOTC_PATH"
BUNDLE_FOLDER = "aotc"  # the folder name inside an app's resources


class CorruptArtifact(BadIndex):
    """An artifact whose bytes do not match the checksum its index records."""


@dataclass(frozen=True, eq=False, repr=False)
class Library:
    """One index and its artifact, where it was found, and why it cannot be used here (if so)."""

    index: Index
    origin: str
    problems: tuple[str, ...] = ()
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _corrupt: list[str] = field(default_factory=list, init=False, repr=False)

    @property
    def usable(self) -> bool:
        return not self.problems

    @property
    def target(self) -> str:
        return self.index.target

    @property
    def name(self) -> str:
        return self.index.library

    @property
    def path(self) -> Path:
        return self.index.path

    @property
    def kernel_names(self) -> set[str]:
        return self.index.kernel_names

    def artifact_bytes(self) -> bytes:
        """The artifact, read once per process; its sha256 is checked against the index then.

        A mismatch adds a problem to this library (so `find` passes over it from then on), warns,
        and raises `CorruptArtifact`.
        """
        with self._lock:
            if self._corrupt:
                raise CorruptArtifact(self._corrupt[0])
            path = self.index.artifact_path
            key = (str(path.resolve()), self.index.data["artifact"].get("sha256"))
            data = _ARTIFACTS.get(key)
            if data is None:
                data = _read_checked(path, key[1])
                if isinstance(data, str):
                    object.__setattr__(self, "problems", (*self.problems, data))
                    message = f"{self.describe_place()}: {data}"
                    self._corrupt.append(message)
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                    raise CorruptArtifact(message)
                _ARTIFACTS[key] = data
            return data

    def __repr__(self) -> str:
        state = "usable" if self.usable else f"problems={list(self.problems)!r}"
        return (
            f"Library({self.name!r}, {self.target!r}, {str(self.path)!r}, "
            f"origin={self.origin!r}, {state})"
        )

    def describe_place(self) -> str:
        return f"aotc library {self.name} ({self.target}, {self.index.path}, from {self.origin})"


# (resolved artifact path, expected sha256) -> bytes: read once per process, whatever finds them.
_ARTIFACTS: dict[tuple[str, str | None], bytes] = {}


def _read_checked(path: Path, expected: str | None) -> bytes | str:
    """The bytes, or a sentence saying why they cannot be trusted."""
    import hashlib

    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"its artifact cannot be read ({exc})"
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        return (
            f"{path.name} has sha256 {actual[:16]}..., its index says {str(expected)[:16]}... "
            "(the artifact was replaced or damaged; rebuild or reinstall it)"
        )
    return data


@dataclass(frozen=True)
class Unreadable:
    """Something in the search order that should have been an index but cannot be read."""

    path: Path
    origin: str
    problem: str
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.path.name.split(".")[0]


# --------------------------------------------------------------------------- the registry

_lock = threading.RLock()
_explicit: list[Library] = []
_discovered: list[Library] | None = None
_unreadable: list[Unreadable] = []  # found by discovery
_explicit_unreadable: list[Unreadable] = []  # found in folders given to load()


def load(path: str | os.PathLike[str]) -> Library:
    """Add a library (an index, an artifact with its index beside it, or a folder of indexes)
    ahead of every other source; later calls come after earlier ones.

    Returns the library the path names; for a folder, the first usable one it holds (else the
    first). Raises `BadIndex` when the path holds no readable index.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise BadIndex(f"{path}: no such file or folder")
    origin = "aotc.load()"
    found: list[Library] = []
    bad: list[Unreadable] = []
    for index_path in _index_files(path):
        try:
            found.append(_make_library(read_index(index_path), origin))
        except BadIndex as exc:
            if path.is_file():
                raise
            bad.append(Unreadable(index_path, origin, str(exc)))
    if not found:
        reasons = "; ".join(item.problem for item in bad)
        raise BadIndex(f"{path}: no aotc index found" + (f" ({reasons})" if reasons else ""))
    with _lock:
        for library in found:
            key = _key(library)
            replaced = [i for i, old in enumerate(_explicit) if _key(old) == key]
            if replaced:  # loaded again (rebuilt, say): read afresh, keep its place
                _explicit[replaced[0]] = library
            else:
                _explicit.append(library)
        _explicit_unreadable.extend(item for item in bad if item not in _explicit_unreadable)
    for item in bad:
        log.warning("aotc: %s: %s", item.path, item.problem)
    chosen = next((library for library in found if library.usable), found[0])
    if not chosen.usable:  # asked for by name: say why it will not serve any call
        problems = "; ".join(chosen.problems)
        warnings.warn(f"aotc: {chosen.path} cannot be used here: {problems}", RuntimeWarning, 2)
    return chosen


def libraries(*, refresh: bool = False) -> list[Library]:
    """Every library in the search order, usable here or not (see the module's docstring).

    Discovery runs once per process; `refresh=True` runs it again (after installing a wheel,
    changing `AOTC_PATH`, or replacing MLX) and re-checks every library's usability.
    """
    global _discovered
    with _lock:
        if refresh:
            _availability.cache_clear()
            _installed_headers.cache_clear()
            _explicit[:] = [_make_library(lib.index, lib.origin) for lib in _explicit]
            _discovered = None
        if _discovered is None:
            _unreadable[:] = []
            _discovered = _discover()
        seen: set[str] = set()
        result = []
        for library in (*_explicit, *_discovered):
            key = _key(library)
            if key not in seen:
                seen.add(key)
                result.append(library)
        return result


def find(target: str, kernel_names: Iterable[str]) -> Library | None:
    """The first usable library for `target`, in the search order, that holds every name."""
    names = set(kernel_names)
    for library in libraries():
        if library.usable and library.target == target and names <= library.kernel_names:
            return library
    return None


def reset() -> None:
    """Forget explicit loads and discovery (for tests and long-lived processes)."""
    global _discovered
    with _lock:
        _explicit.clear()
        _explicit_unreadable.clear()
        _unreadable.clear()
        _discovered = None
        _ARTIFACTS.clear()
        _availability.cache_clear()
        _installed_headers.cache_clear()


def _key(library: Library) -> str:
    return str(library.index.path.resolve())


# --------------------------------------------------------------------------- discovery


def _discover() -> list[Library]:
    found: list[Library] = []
    for folder_or_file, origin, must_exist in _sources():
        found += _libraries_at(folder_or_file, origin, must_exist)
    return found


def _sources() -> Iterator[tuple[Path, str, bool]]:
    """(path, origin, whether a missing path is worth reporting), in the search order."""
    for entry in os.environ.get(ENV_PATH, "").split(os.pathsep):
        if entry.strip():
            yield Path(entry.strip()).expanduser(), ENV_PATH, True
    for origin, value, folder, problem in _entry_point_folders():
        if problem is not None:
            _unreadable.append(Unreadable(Path(value), origin, problem, origin.rsplit(":")[-1]))
            log.warning("aotc: %s: %s", origin, problem)
        else:
            yield Path(folder), origin, True
    for folder, kind in bundle_folders():
        yield folder, f"bundle {kind}", False


def _libraries_at(path: Path, origin: str, must_exist: bool) -> list[Library]:
    if not path.exists():
        if must_exist:
            _unreadable.append(Unreadable(path, origin, "no such file or folder"))
        return []
    found = []
    try:
        index_files = _index_files(path)
    except BadIndex as exc:
        _unreadable.append(Unreadable(path, origin, str(exc)))
        return []
    for index_path in index_files:
        try:
            found.append(_make_library(read_index(index_path), origin))
        except BadIndex as exc:
            _unreadable.append(Unreadable(index_path, origin, str(exc)))
            log.warning("aotc: %s", exc)
    return found


def _index_files(path: Path) -> list[Path]:
    """The index files a path stands for (see `load`)."""
    from aotc.targets import TARGETS

    if path.is_dir():
        suffixes = tuple(f".{name}.json" for name in TARGETS)
        return sorted(p for p in path.iterdir() if p.name.endswith(suffixes) and p.is_file())
    if path.suffix == ".json":
        return [path]
    by_suffix = {target.artifact_suffix: name for name, target in TARGETS.items()}
    if path.suffix in by_suffix:
        beside = path.with_name(f"{path.stem}.{by_suffix[path.suffix]}.json")
        if beside.is_file():
            return [beside]
        for candidate in sorted(path.parent.glob("*.json")):
            try:
                if read_index(candidate).data["artifact"].get("file") == path.name:
                    return [candidate]
            except (BadIndex, AttributeError, TypeError):
                continue
        raise BadIndex(f"{path}: no index beside this artifact (expected {beside.name})")
    if not path.exists():
        raise BadIndex(f"{path}: no such file or folder")
    raise BadIndex(
        f"{path}: not an aotc index (.json), artifact ({', '.join(sorted(by_suffix))}) or folder"
    )


def _entry_point_folders() -> list[tuple[str, str, str | None, str | None]]:
    """(origin, value, folder, problem) of each `aotc.libraries` entry point, in search order."""
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)

    def dist_name(ep: importlib.metadata.EntryPoint) -> str:
        dist = getattr(ep, "dist", None)
        return dist.name if dist is not None else ""

    result = []
    seen = set()
    for ep in sorted(points, key=lambda ep: (_canonical(dist_name(ep)), ep.name, ep.value)):
        if (dist_name(ep), ep.name, ep.value) in seen:  # one dist found twice on sys.path
            continue
        seen.add((dist_name(ep), ep.name, ep.value))
        origin = f"entry point {dist_name(ep) or '?'}:{ep.name}"
        try:
            result.append((origin, ep.value, str(_resolve_entry_point(ep.value)), None))
        except Exception as exc:  # a broken plugin must not break every MLX program
            problem = f"entry point {ep.value!r} does not resolve: {exc}"
            result.append((origin, ep.value, None, problem))
    return result


def _resolve_entry_point(value: str) -> Path:
    module_name, _, attr = value.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if attr:
        obj: Any = import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        if callable(obj):
            obj = obj()
        return Path(obj)
    spec = importlib.util.find_spec(module_name)
    if spec is None:
        raise ModuleNotFoundError(f"no module named {module_name!r}")
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise ValueError(f"{module_name!r} is a module, not a package: name `module:attr` instead")
    return Path(locations[0])


def _canonical(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def bundle_folders() -> list[tuple[Path, str]]:
    """Candidate resource folders of a frozen or bundled app, in the search order, deduplicated."""
    candidates: list[tuple[Path, str]] = []
    frozen = bool(getattr(sys, "frozen", False))
    meipass = getattr(sys, "_MEIPASS", None)
    if frozen and meipass:
        candidates.append((Path(meipass) / BUNDLE_FOLDER, "PyInstaller"))
    executable = Path(sys.executable) if sys.executable else None
    if frozen and executable is not None:
        candidates.append((executable.parent / BUNDLE_FOLDER, "frozen app"))
    if executable is not None:
        app = next((p for p in executable.parents if p.suffix == ".app"), None)
        if app is not None:
            candidates.append((app / "Contents" / "Resources" / BUNDLE_FOLDER, f"{app.name}"))
    resourcepath = os.environ.get("RESOURCEPATH")
    if resourcepath:
        candidates.append((Path(resourcepath) / BUNDLE_FOLDER, "py2app"))
    package = _main_package_folder()
    if package is not None:
        candidates.append((package / "resources" / BUNDLE_FOLDER, f"app package {package.name}"))
    result, seen = [], set()
    for folder, kind in candidates:
        key = os.path.realpath(folder)
        if key not in seen:
            seen.add(key)
            result.append((folder, kind))
    return result


def _main_package_folder() -> Path | None:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    parent = getattr(spec, "parent", None)
    if not parent:
        return None
    package = sys.modules.get(parent.split(".")[0])
    locations = getattr(getattr(package, "__spec__", None), "submodule_search_locations", None)
    return Path(next(iter(locations))) if locations else None


# --------------------------------------------------------------------------- usability here


def _make_library(index: Index, origin: str) -> Library:
    return Library(index=index, origin=origin, problems=tuple(_problems(index)))


def _problems(index: Index) -> list[str]:
    problems = []
    target = index.target
    available = _availability(target)
    if available is None:
        problems.append("MLX is not installed here")
    elif target not in ("cuda", "metal"):
        problems.append(f"unknown target {target!r} (this aotc knows cuda and metal)")
    elif available is False:
        problems.append(
            f"this MLX has no {target} backend available here "
            f"(mlx.core.{target}.is_available() is not True)"
        )
    installed = _installed_mlx_version()
    built_with = index.mlx_version
    if installed is not None and built_with != installed:
        problems.append(f"built for MLX {built_with}, installed is MLX {installed}")
    checks = {"metal": (_metal_headers_problem, _macos_problem), "cuda": (_cuda_sources_problem,)}
    problems += [p for check in checks.get(target, ()) if (p := check(index))]
    if not index.artifact_path.is_file():
        problems.append(f"its artifact {index.artifact_path.name} is missing beside its index")
    return problems


@cache
def _availability(target: str) -> bool | None:
    """Whether MLX has this GPU backend here; None when MLX is not installed."""
    try:
        import mlx.core as mx
    except ImportError:
        return None
    module = getattr(mx, target, None)
    is_available = getattr(module, "is_available", None)
    if is_available is None:
        return False
    try:
        return bool(is_available())
    except Exception:  # a backend that fails to start is not available
        return False


def _installed_mlx_version() -> str | None:
    from aotc.mlx_info import mlx_version

    version = mlx_version()
    if version is None:  # frozen apps often lack dist-info: ask the module itself
        try:
            import mlx.core as mx

            version = getattr(mx, "__version__", None)
        except ImportError:
            return None
    return version


def _metal_headers_problem(index: Index) -> str | None:
    return _headers_problem(
        index,
        "metal",
        "mlx",
        index.data["mlx"].get("headers_sha256"),
        "built against other MLX Metal kernel headers than the installed MLX's "
        "(rebuild it with this MLX)",
    )


def _cuda_sources_problem(index: Index) -> str | None:
    """The CUDA launch plan mirrors this aotc's kernel templates (tile sizes, Params fields, merge
    modes): a library built from other templates may not fit it. An index that records no
    digest (older aotc) is not judged by it."""
    expected = (index.data.get("sources_sha256") or {}).get("aotc")
    return _headers_problem(
        index,
        "cuda",
        "aotc",
        expected,
        "built from other aotc kernel templates than this aotc's, which its launch plan "
        "may not fit (rebuild it with this aotc)",
        judge_missing=False,
    )


def _headers_problem(
    index: Index,
    target: str,
    origin: str,
    expected: str | None,
    mismatch: str,
    *,
    judge_missing: bool = True,
) -> str | None:
    """`mismatch` when the index's recorded digest of the `origin` headers differs from the
    installed ones' (a missing record counts as different unless `judge_missing` is off); an
    unknown family's problem; None when the headers are not installed here."""
    families = frozenset(kernel.get("family") for kernel in index.kernels)
    digest = _installed_headers(families, target, origin)
    if isinstance(digest, tuple):  # (problem,)
        return digest[0]
    if digest is None or (expected is None and not judge_missing):
        return None
    return mismatch if expected != digest else None


def _macos_problem(index: Index) -> str | None:
    """A metallib whose minimum macOS is newer than this Mac's cannot load."""
    import platform

    options = index.data.get("options") or {}
    if sys.platform != "darwin" or options.get("sdk", "macosx") != "macosx":
        return None
    wanted, here = options.get("deployment_target"), platform.mac_ver()[0]
    if wanted and here and _version_tuple(here) < _version_tuple(str(wanted)):
        return f"built for macOS {wanted} or newer, this Mac runs macOS {here}"
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = [int(part) for part in version.split(".") if part.isdigit()]
    return tuple(numbers + [0] * (3 - len(numbers)))


@cache
def _installed_headers(
    families: frozenset[str | None], target: str, origin: str
) -> str | tuple[str] | None:
    """The digest `aotc build` records today for the `origin` headers ("mlx": MLX's kernel
    headers, "aotc": this aotc's kernel templates) of `target`; None when it cannot be computed
    here (the headers are not installed, as in most frozen apps: the other checks stand alone
    then); `(problem,)` for a family this aotc does not know."""
    from aotc.codegen import installed_header_digest
    from aotc.families import FAMILIES

    unknown = sorted({name for name in families if name not in FAMILIES}, key=str)
    if unknown:
        return (f"kernel family {unknown[0]!r} is unknown to this aotc (upgrade aotc)",)
    try:
        return installed_header_digest(set(families), target, origin)
    except FileNotFoundError:
        log.debug("aotc: the %s headers for %s are not installed here", origin, target)
        return None


# --------------------------------------------------------------------------- `aotc libraries`


def describe() -> list[dict]:
    """Every library in the search order, for `aotc libraries [--json]`.

    Each entry: name, target, origin, path (the index), artifact, usable, problems, kernels (how
    many), serves (how many of its kernels it serves), shadowed (kernel -> the library that serves
    it instead, for kernels several libraries provide). Indexes that cannot be read come last,
    with `usable: false` and their problem.
    """
    found = libraries()
    server: dict[tuple[str, str], Library] = {}
    for library in found:
        if library.usable:
            for name in library.kernel_names:
                server.setdefault((library.target, name), library)
    with _lock:
        bad = list(dict.fromkeys([*_explicit_unreadable, *_unreadable]))
    return [_library_entry(library, server) for library in found] + [
        _unreadable_entry(item) for item in bad
    ]


def _library_entry(library: Library, server: dict[tuple[str, str], Library]) -> dict:
    """`describe()`'s entry of a readable library; `server`: (target, kernel) -> the library
    that serves that kernel."""
    shadowed = {
        name: f"{other.name} ({other.origin}, {other.path})"
        for name in sorted(library.kernel_names)
        if (other := server.get((library.target, name))) is not None and other is not library
    }
    return {
        "name": library.name,
        "target": library.target,
        "origin": library.origin,
        "path": str(library.path),
        "artifact": str(library.index.artifact_path),
        "usable": library.usable,
        "problems": list(library.problems),
        "kernels": len(library.kernel_names),
        "serves": sum(
            server.get((library.target, name)) is library for name in library.kernel_names
        ),
        "shadowed": shadowed,
    }


def _unreadable_entry(item: Unreadable) -> dict:
    """`describe()`'s entry of an index that could not be read."""
    return {
        "name": item.label,
        "target": None,
        "origin": item.origin,
        "path": str(item.path),
        "artifact": None,
        "usable": False,
        "problems": [item.problem],
        "kernels": 0,
        "serves": 0,
        "shadowed": {},
    }


def render(entries: list[dict]) -> str:
    """`describe()` as text, one block per library, in the search order."""
    if not entries:
        return (
            "no aotc libraries found (searched: aotc.load(), AOTC_PATH, entry points "
            f"{ENTRY_POINT_GROUP!r}, app bundle resources)"
        )
    lines = []
    for number, entry in enumerate(entries, 1):
        state = "usable" if entry["usable"] else "not usable"
        target = entry["target"] or "?"
        lines.append(
            f"{number}. {entry['name']} [{target}] {entry['kernels']} kernels, {state}"
            f" — {entry['origin']}"
        )
        lines.append(f"   {entry['path']}")
        lines += [f"   problem: {problem}" for problem in entry["problems"]]
        for kernel, other in entry["shadowed"].items():
            lines.append(f"   {kernel}: served by {other}")
    return "\n".join(lines)
