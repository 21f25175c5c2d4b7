"""`aotc verify`: does dist/ hold what the manifest asks for, intact, for this MLX?"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from aotc.artifact import BadIndex, index_name, read_index, sha256_file
from aotc.codegen import installed_header_digest, translation_units
from aotc.manifest import Manifest
from aotc.mlx_info import mlx_version


class Verdict(IntEnum):
    """Exit codes scripts can rely on; when several problems occur the most severe one wins."""

    OK = 0
    NOT_BUILT = 10  # no index or artifact in dist/ for a target of the manifest
    CORRUPT = 11  # the container does not parse, or a function's module fails its hash
    CHECKSUM_MISMATCH = 12  # the artifact is not the file its index describes
    MISSING_KERNELS = 13  # an instantiation of the manifest is not in the artifact or index
    MLX_MISMATCH = 14  # built for another MLX version or other MLX headers
    TARGET_MISMATCH = 15  # another platform / minimum OS / GPU archs than the manifest's


_SEVERITY = [
    Verdict.NOT_BUILT,
    Verdict.CORRUPT,
    Verdict.CHECKSUM_MISMATCH,
    Verdict.MISSING_KERNELS,
    Verdict.MLX_MISMATCH,
    Verdict.TARGET_MISMATCH,
]


@dataclass
class TargetReport:
    target: str
    artifact: Path
    problems: list[tuple[Verdict, str]] = field(default_factory=list)
    kernels_checked: int = 0

    def fail(self, verdict: Verdict, message: str) -> None:
        self.problems.append((verdict, message))

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "artifact": str(self.artifact),
            "ok": not self.problems,
            "kernels_checked": self.kernels_checked,
            "problems": [{"code": int(v), "kind": v.name, "message": m} for v, m in self.problems],
        }


def verdict_of(reports: list[TargetReport]) -> Verdict:
    found = {verdict for report in reports for verdict, _ in report.problems}
    return next((v for v in _SEVERITY if v in found), Verdict.OK)


def verify(manifest: Manifest, dist: Path, targets: list[str] | None = None) -> list[TargetReport]:
    return [_verify_target(manifest, dist, name) for name in targets or list(manifest.targets)]


def _verify_target(manifest: Manifest, dist: Path, target: str) -> TargetReport:
    index_path = dist / index_name(manifest.library, target)
    report = TargetReport(target, index_path)
    try:
        index = read_index(index_path)
    except BadIndex as exc:
        report.fail(Verdict.NOT_BUILT, str(exc))
        return report
    report.artifact = index.artifact_path
    if not index.artifact_path.is_file():
        report.fail(Verdict.NOT_BUILT, f"{index.artifact_path} is missing")
        return report
    actual = sha256_file(index.artifact_path)
    if actual != index.data["artifact"]["sha256"]:
        report.fail(
            Verdict.CHECKSUM_MISMATCH,
            f"{index.artifact_path.name} has sha256 {actual[:16]}..., the index says "
            f"{index.data['artifact']['sha256'][:16]}...",
        )
    expected = {k.name for unit in translation_units(manifest, target) for k in unit.kernels}
    reader = _READERS[target]
    try:
        present = reader(index.artifact_path, manifest, report)
    except ValueError as exc:  # the readers' errors (MetallibError, FatbinError) say where
        report.fail(Verdict.CORRUPT, f"{index.artifact_path.name}: {exc}")
        return report
    report.kernels_checked = len(expected)
    missing = sorted(expected - present)
    if missing:
        report.fail(Verdict.MISSING_KERNELS, f"not in the artifact: {', '.join(missing)}")
    missing_from_index = sorted(expected - index.kernel_names)
    if missing_from_index:
        report.fail(Verdict.MISSING_KERNELS, f"not in the index: {', '.join(missing_from_index)}")
    _check_mlx(index.data, manifest, target, report)
    return report


def _check_mlx(data: dict, manifest: Manifest, target: str, report: TargetReport) -> None:
    built_with, installed = data["mlx"].get("version"), mlx_version()
    if built_with != installed:
        report.fail(Verdict.MLX_MISMATCH, f"built for MLX {built_with}, installed is {installed}")
    if target != "metal":
        return
    families = {inst.family for inst in manifest.for_target(target)}
    expected = installed_header_digest(families, target)
    if expected and data["mlx"].get("headers_sha256") != expected:
        report.fail(Verdict.MLX_MISMATCH, "built against other MLX kernel headers than installed")


def _metallib_kernels(path: Path, manifest: Manifest, report: TargetReport) -> set[str]:
    from aotc.formats.metallib import read_metallib

    library = read_metallib(path)
    for problem in library.verify_hashes():
        report.fail(Verdict.CORRUPT, problem)
    options = manifest.targets["metal"]
    wanted_platform = {"macosx": "macOS", "iphoneos": "iOS", "xros": "visionOS"}[options.sdk]
    if library.platform != wanted_platform:
        report.fail(
            Verdict.TARGET_MISMATCH,
            f"built for {library.platform}, manifest wants {wanted_platform}",
        )
    if not _same_version(library.platform_version, options.deployment_target):
        report.fail(
            Verdict.TARGET_MISMATCH,
            f"minimum OS {library.platform_version}, manifest wants {options.deployment_target}",
        )
    return {function.name for function in library.functions}


def _fatbin_kernels(path: Path, manifest: Manifest, report: TargetReport) -> set[str]:
    from aotc.formats.fatbin import read_fatbin

    fatbin = read_fatbin(path.read_bytes())
    options = manifest.targets["cuda"]
    wanted = set(options.images)
    if set(fatbin.archs()) != wanted:
        held, asked = ", ".join(sorted(fatbin.archs())), ", ".join(sorted(wanted))
        report.fail(Verdict.TARGET_MISMATCH, f"holds {held}, manifest wants {asked}")
    return fatbin.kernels()


def _same_version(a: str, b: str) -> bool:
    def parts(version: str) -> tuple[int, ...]:
        numbers = [int(p) for p in version.split(".") if p.isdigit()]
        return tuple(numbers + [0] * (3 - len(numbers)))

    return parts(a) == parts(b)


_READERS = {"metal": _metallib_kernels, "cuda": _fatbin_kernels}
