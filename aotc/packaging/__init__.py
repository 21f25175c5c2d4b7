"""Shipping built artifacts: wheels (`aotc wheel`), app bundles (`aotc bundle`), a hatchling
build hook (`[tool.hatch.build.hooks.aotc]`) for downstream projects.

Everything here ships what `aotc build` published in `dist/`, after checking that each index
belongs to the manifest, holds all of its kernels and matches its artifact's checksum.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from aotc.artifact import Index, index_name, read_index, sha256_file
from aotc.codegen import translation_units
from aotc.errors import AotcError
from aotc.manifest import Manifest

Reporter = Callable[[str], None]

# A CUDA fatbin holds device code only, so one file serves every Linux host MLX's CUDA backend
# runs on; the tag keeps the wheel to those. glibc 2.28 is a floor below what MLX's CUDA wheels
# need anyway (the artifact itself links nothing).
CUDA_PLATFORM_TAGS = ("manylinux_2_28_x86_64", "manylinux_2_28_aarch64")


class PackagingError(AotcError):
    """What was asked cannot be shipped as it is (the message says what to run first)."""

    exit_code = 6


def collect(
    manifest: Manifest,
    dist: Path,
    targets: Sequence[str] | None = None,
    report: Reporter = lambda line: None,
) -> list[Index]:
    """The checked indexes in `dist` of `targets` (default: every target of the manifest whose
    index is there, reporting the others)."""
    asked = list(targets) if targets else list(manifest.targets)
    found = []
    for target in asked:
        if target not in manifest.targets:
            raise PackagingError(
                f"{manifest.path} has no target {target!r} (it has: {', '.join(manifest.targets)})"
            )
        path = dist / index_name(manifest.library, target)
        if not path.is_file():
            hint = f"build it with `aotc build {manifest.path} --target {target} --out {dist}`"
            if targets:
                raise PackagingError(f"{path} is missing: {hint}")
            report(f"skipping {target}: {path} is missing ({hint})")
            continue
        found.append(check_index(manifest, read_index(path)))
    if not found:
        raise PackagingError(
            f"{dist} holds no index of {manifest.library}: run `aotc build {manifest.path}` first"
        )
    return found


def check_index(manifest: Manifest, index: Index) -> Index:
    """`index` is the manifest's library, complete, and its artifact is intact."""
    if index.library != manifest.library:
        raise PackagingError(
            f"{index.path} is library {index.library!r}, the manifest's is {manifest.library!r}"
        )
    artifact = index.artifact_path
    if not artifact.is_file():
        raise PackagingError(f"{artifact} is missing beside {index.path.name}: rebuild it")
    actual = sha256_file(artifact)
    if actual != index.data["artifact"].get("sha256"):
        raise PackagingError(
            f"{artifact} does not match the checksum in {index.path.name}: rebuild it "
            f"(`aotc build {manifest.path} --target {index.target}`)"
        )
    expected = {k.name for unit in translation_units(manifest, index.target) for k in unit.kernels}
    missing = sorted(expected - index.kernel_names)
    if missing:
        raise PackagingError(
            f"{index.path} lacks {len(missing)} kernels of {manifest.path} "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): rebuild it"
        )
    return index


def platform_tags(index: Index) -> tuple[str, ...]:
    """Wheel platform tags for an artifact of `index.target`.

    CUDA: `CUDA_PLATFORM_TAGS`. Metal: Apple silicon at the deployment target the library was
    built for: `macosx_<major>_0_arm64` (pip matches only minor 0 from macOS 11 on, so 14.2
    becomes 14_0; aotc's loader then refuses the library on 14.0 and 14.1), or
    `ios_<major>_<minor>_arm64_iphoneos` (PEP 730) for the iphoneos SDK. visionOS has no wheel
    tag: ship those with `aotc bundle`.
    """
    if index.target == "cuda":
        return CUDA_PLATFORM_TAGS
    if index.target != "metal":
        raise PackagingError(f"{index.path}: no wheel platform for target {index.target!r}")
    options = index.data.get("options") or {}
    sdk = options.get("sdk", "macosx")
    deployment = str(options.get("deployment_target", "14.0"))
    if not re.fullmatch(r"\d+(\.\d+){0,2}", deployment):
        raise PackagingError(f"{index.path}: deployment target {deployment!r} is not a version")
    major, minor = (int(part) for part in ([*deployment.split("."), "0"])[:2])
    if sdk == "macosx":
        return (f"macosx_{major}_{minor if major < 11 else 0}_arm64",)
    if sdk == "iphoneos":
        return (f"ios_{major}_{minor}_arm64_iphoneos",)
    raise PackagingError(
        f"{index.path}: the {sdk} SDK has no wheel platform tag; lay it into the app with "
        "`aotc bundle` instead"
    )


def package_init(library: str, indexes: Sequence[Index]) -> str:
    """The `__init__.py` of a generated package holding artifacts (the entry point's target)."""
    files = sorted({name for i in indexes for name in (i.path.name, i.artifact_path.name)})
    return (
        f'"""Prebuilt aotc kernels of the library {library!r}, found by aotc through the\n'
        f'`aotc.libraries` entry point: {", ".join(files)}."""\n\n'
        "from pathlib import Path\n\n"
        "LIBRARY_DIR = Path(__file__).resolve().parent\n"
    )
