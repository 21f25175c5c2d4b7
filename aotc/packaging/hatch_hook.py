"""A hatchling plugin: a downstream project's `pip wheel .` builds its aotc kernels and ships them.

```toml
[build-system]
requires = ["hatchling>=1.25", "aotc"]
build-backend = "hatchling.build"

[project]
name = "my-app"
dynamic = ["entry-points"]            # filled by the metadata hook below

[tool.hatch.metadata.hooks.aotc]      # adds [aotc.libraries] <library> = <package>
[tool.hatch.build.hooks.aotc]         # builds manifest.yaml, puts the artifacts into <package>
manifest = "manifest.yaml"            # default
targets = ["cuda"]                    # default: metal on macOS, cuda elsewhere
```

Build hook settings (all optional): `manifest` (relative to the project), `targets`, `package`
(default `aotc_lib_<library>`; a package the hook creates in the wheel, holding the artifacts,
their indexes and an `__init__.py`), `build-dir` (default `build/aotc`), `jobs`, `prebuilt` (a
folder holding already built artifacts and indexes: ship those instead of building).

Instead of the metadata hook, the entry point may be written statically:
`[project.entry-points."aotc.libraries"] <library> = "<package>"`; the build hook checks that
the wheel declares it either way. The plugin is registered through the `hatch` entry point group
(`[project.entry-points.hatch] aotc = "aotc.packaging.hatch_hook"` in aotc's own metadata).
"""

from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface
from hatchling.metadata.plugin.interface import MetadataHookInterface
from hatchling.plugin import hookimpl

from aotc.runtime.libraries import ENTRY_POINT_GROUP

PLUGIN_NAME = "aotc"
_SETTINGS = {"manifest", "targets", "package", "build-dir", "jobs", "prebuilt"}
# Keys hatchling itself reads from every hook table (and `path`, from a custom hook's table).
_HATCH_KEYS = {
    "dependencies",
    "require-runtime-dependencies",
    "require-runtime-features",
    "enable-by-default",
    "path",
}


@dataclass(frozen=True)
class Settings:
    root: Path
    manifest: Path
    targets: tuple[str, ...] | None
    package: str | None
    build_dir: Path
    jobs: int | None
    prebuilt: Path | None

    @classmethod
    def parse(cls, root: str | Path, config: dict[str, Any], where: str) -> Settings:
        root = Path(root)
        unknown = sorted(set(config) - _SETTINGS - _HATCH_KEYS)
        if unknown:
            raise ValueError(
                f"{where}: unknown setting {', '.join(map(repr, unknown))} "
                f"(allowed: {', '.join(sorted(_SETTINGS))})"
            )
        targets = config.get("targets")
        if targets is not None and (
            not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)
        ):
            raise TypeError(f"{where}: `targets` must be a list of target names")
        jobs = config.get("jobs")
        if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
            raise TypeError(f"{where}: `jobs` must be a positive integer")
        prebuilt = config.get("prebuilt")
        return cls(
            root=root,
            manifest=root / str(config.get("manifest", "manifest.yaml")),
            targets=tuple(targets) if targets is not None else None,
            package=config.get("package"),
            build_dir=root / str(config.get("build-dir", "build/aotc")),
            jobs=jobs,
            prebuilt=root / str(prebuilt) if prebuilt is not None else None,
        )

    def manifest_and_package(self):
        from aotc.manifest import load_manifest

        manifest = load_manifest(self.manifest)
        return manifest, self.package or default_package(manifest.library)

    def target_names(self, manifest) -> list[str]:
        if self.targets is not None:
            return list(self.targets)
        host = "metal" if sys.platform == "darwin" else "cuda"
        if host not in manifest.targets:
            raise ValueError(
                f"{manifest.path} has no {host} target, the one this machine builds; "
                "name the targets with `targets = [...]` in [tool.hatch.build.hooks.aotc]"
            )
        return [host]


def default_package(library: str) -> str:
    return f"aotc_lib_{library}"


class AotcBuildHook(BuildHookInterface):
    """Builds (or takes prebuilt) artifacts and force-includes them as a package of the wheel."""

    PLUGIN_NAME = PLUGIN_NAME

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        from aotc.packaging import collect, package_init, platform_tags

        settings = Settings.parse(self.root, self.config, "[tool.hatch.build.hooks.aotc]")
        manifest, package = settings.manifest_and_package()
        self._check_entry_point(manifest.library, package)
        targets = settings.target_names(manifest)
        if settings.prebuilt is not None:
            dist = settings.prebuilt
        else:
            dist = settings.build_dir / "dist"
            self._build(settings, manifest, targets, dist)
        indexes = collect(manifest, dist, targets, self.app.display_info)
        folder = package.replace(".", "/")
        include = build_data.setdefault("force_include", {})
        for index in indexes:
            include[str(index.artifact_path)] = f"{folder}/{index.artifact_path.name}"
            include[str(index.path)] = f"{folder}/{index.path.name}"
        if not _is_source_package(settings.root, folder):
            init = settings.build_dir / "package" / folder / "__init__.py"
            init.parent.mkdir(parents=True, exist_ok=True)
            text = package_init(manifest.library, indexes)
            if not init.is_file() or init.read_text() != text:
                init.write_text(text)
            include[str(init)] = f"{folder}/__init__.py"
        tags = sorted({tag for index in indexes for tag in platform_tags(index)})
        build_data["tag"] = f"py3-none-{'.'.join(tags)}"
        build_data["pure_python"] = False
        self.app.display_info(
            f"aotc: {manifest.library} ({', '.join(i.target for i in indexes)}) -> {folder}/, "
            f"entry point [{ENTRY_POINT_GROUP}] {manifest.library} = {package}"
        )

    def _build(self, settings: Settings, manifest, targets: list[str], dist: Path) -> None:
        from aotc.build import build_target

        for target in targets:
            self.app.display_info(f"aotc: building {manifest.library} for {target}")
            build_target(
                manifest,
                target,
                out_dir=dist,
                build_dir=settings.build_dir,
                jobs=settings.jobs,
                report=self.app.display_info,
            )

    def _check_entry_point(self, library: str, package: str) -> None:
        declared = self.metadata.core.entry_points.get(ENTRY_POINT_GROUP, {})
        value = declared.get(library)
        if value is None:
            raise ValueError(
                f"the wheel must declare the entry point through which aotc finds {library}: add "
                f'`[project.entry-points."{ENTRY_POINT_GROUP}"]` `{library} = "{package}"` to '
                'pyproject.toml, or `dynamic = ["entry-points"]` and '
                "`[tool.hatch.metadata.hooks.aotc]`"
            )
        if value.strip() != package:
            raise ValueError(
                f"entry point [{ENTRY_POINT_GROUP}] {library} = {value!r}, but the artifacts go "
                f"into {package!r}: make them the same (`package` setting of the hook)"
            )

    def clean(self, versions: list[str]) -> None:
        import shutil

        settings = Settings.parse(self.root, self.config, "[tool.hatch.build.hooks.aotc]")
        shutil.rmtree(settings.build_dir, ignore_errors=True)


class AotcMetadataHook(MetadataHookInterface):
    """Adds `[aotc.libraries] <library> = <package>` (needs `dynamic = ["entry-points"]`).

    Settings: its own table, else the build hook's (`manifest`, `package`); `entry-points`: other
    entry point groups of the project, which cannot be static once the field is dynamic.
    """

    PLUGIN_NAME = PLUGIN_NAME

    def update(self, metadata: dict[str, Any]) -> None:
        config = {**_build_hook_table(Path(self.root)), **self.config}
        extra = config.pop("entry-points", {})
        settings = Settings.parse(self.root, config, "[tool.hatch.metadata.hooks.aotc]")
        manifest, package = settings.manifest_and_package()
        groups = {group: dict(points) for group, points in extra.items()}
        groups.setdefault(ENTRY_POINT_GROUP, {})[manifest.library] = package
        metadata["entry-points"] = groups


def _build_hook_table(root: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    build = data.get("tool", {}).get("hatch", {}).get("build", {})
    table = build.get("hooks", {}).get(PLUGIN_NAME)
    if table is None:
        table = build.get("targets", {}).get("wheel", {}).get("hooks", {}).get(PLUGIN_NAME, {})
    return {k: v for k, v in table.items() if k in ("manifest", "package")}


def _is_source_package(root: Path, folder: str) -> bool:
    return any((base / folder / "__init__.py").is_file() for base in (root, root / "src"))


@hookimpl
def hatch_register_build_hook():
    return AotcBuildHook


@hookimpl
def hatch_register_metadata_hook():
    return AotcMetadataHook
