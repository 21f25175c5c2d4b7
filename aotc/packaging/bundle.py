"""`aotc bundle MANIFEST --into PATH`: lay built artifacts and indexes into an app's resources.

- `PATH` ending in `.app`: `PATH/Contents/Resources/aotc/`, found by the loader from
  `sys.executable` inside the app (PyInstaller `.app`, py2app, any macOS app embedding Python);
  by default only the Metal artifact goes there (a Mac runs nothing else).
- any other `PATH`: that folder itself, e.g. a SwiftPM target's resources, a folder that a
  PyInstaller spec ships as `datas=[("<PATH>", "aotc")]` (found as `sys._MEIPASS/aotc`), or a
  Briefcase app's `src/<app>/resources/aotc`.

The loader (`aotc.runtime.libraries`) reads them with no compiler and no network. Each file is
written by an atomic rename, the artifact before its index.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from aotc.artifact import publish
from aotc.manifest import load_manifest
from aotc.packaging import PackagingError, Reporter, collect
from aotc.runtime.libraries import BUNDLE_FOLDER


def bundle_folder(into: Path) -> Path:
    """Where the files go for `--into PATH`."""
    if into.suffix == ".app":
        return into / "Contents" / "Resources" / BUNDLE_FOLDER
    return into


def lay_bundle(
    manifest_path: Path,
    *,
    into: Path,
    dist: Path = Path("dist"),
    targets: Sequence[str] | None = None,
    report: Reporter = lambda line: None,
) -> list[Path]:
    """Copy the checked artifacts and indexes of the manifest's library from `dist` into the
    bundle; returns the index paths written. `targets` default: `metal` for a `.app`, else every
    target whose index is in `dist`."""
    manifest = load_manifest(manifest_path)
    if targets is None and into.suffix == ".app":
        if "metal" not in manifest.targets:
            raise PackagingError(
                f"{into} is a macOS app, which runs Metal kernels, and {manifest.path} has no "
                "metal target: name the targets to lay there"
            )
        targets = ["metal"]
    folder = bundle_folder(into)
    written = []
    for index in collect(manifest, dist, targets, report):
        _, index_dest = publish(index.artifact_path, index.data, folder)
        report(f"{index.target}: {index.artifact_path.name} and {index_dest.name} -> {folder}")
        written.append(index_dest)
    return written
