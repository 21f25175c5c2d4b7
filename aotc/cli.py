"""The `aotc` command line."""

from __future__ import annotations

import json
import shutil
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from aotc import __version__
from aotc.build import build_target, configure, locked, ninja_commands
from aotc.codegen import generate, translation_units, tree_root
from aotc.errors import AotcError, ToolchainMissing
from aotc.manifest import Manifest, load_manifest
from aotc.targets import TARGETS

app = typer.Typer(
    help="Ahead-of-time kernel compiler for MLX: prebuilt Metal and CUDA kernels from a manifest.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class TargetChoice(StrEnum):
    metal = "metal"
    cuda = "cuda"
    all = "all"


ManifestArg = Annotated[Path, typer.Argument(help="The manifest (YAML).", show_default=False)]
OutOption = Annotated[Path, typer.Option("--out", help="Where artifacts and indexes go.")]
BuildDirOption = Annotated[Path, typer.Option("--build-dir", help="Where build trees go.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _load(path: Path) -> Manifest:
    manifest = load_manifest(path)
    for warning in manifest.warnings:
        _err(f"warning: {warning}")
    return manifest


def _targets_for(manifest: Manifest, target: TargetChoice | None) -> list[str]:
    if target in (None, TargetChoice.all):
        return list(manifest.targets)
    if target.value not in manifest.targets:
        raise AotcError(
            f"{manifest.path} has no target {target.value!r} "
            f"(it has: {', '.join(manifest.targets)})"
        )
    return [target.value]


@app.command()
def build(
    manifest_path: ManifestArg,
    target: Annotated[
        TargetChoice | None,
        typer.Option(
            "--target", help="Build this target; default: every target whose toolchain is here."
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", "-j", min=1, help="Parallel compiles (default: all cores)."),
    ] = None,
    out: OutOption = Path("dist"),
    build_dir: BuildDirOption = Path("build"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show every command.")] = False,
) -> None:
    """Validate MANIFEST, generate the sources, compile them, and publish the artifacts."""
    manifest = _load(manifest_path)
    names = _targets_for(manifest, target)
    built = 0
    for name in names:
        try:
            TARGETS[name].find_toolchain()
        except ToolchainMissing as exc:
            if target is not None:
                raise
            _err(f"skipping {name}: {exc}")
            continue
        count = sum(len(unit.kernels) for unit in translation_units(manifest, name))
        _err(f"{name}: building {count} kernels of {manifest.library}")
        result = build_target(
            manifest,
            name,
            out_dir=out,
            build_dir=build_dir,
            jobs=jobs,
            verbose=verbose,
            report=_err,
        )
        state = "published" if result.published else "up to date"
        compiled = sum(step.startswith("compiling") for step in result.compiled)
        typer.echo(
            f"{name}: {result.artifact} and {result.index} {state} ({compiled} units compiled)"
        )
        built += 1
    if not built:
        raise ToolchainMissing("no target of the manifest has its toolchain on this machine")


@app.command("generate")
def generate_command(
    manifest_path: ManifestArg,
    target: Annotated[
        TargetChoice, typer.Option("--target", help="Which build tree to write.")
    ] = TargetChoice.all,
    build_dir: BuildDirOption = Path("build"),
) -> None:
    """Write the build trees (sources, headers, CMakeLists.txt) without compiling."""
    manifest = _load(manifest_path)
    for name in _targets_for(manifest, target):
        try:
            toolchain = TARGETS[name].find_toolchain()
        except ToolchainMissing:
            toolchain = None
        with locked(tree_root(build_dir, manifest.library, name)):
            tree = generate(manifest, name, build_dir, toolchain)
            configure(tree)
        typer.echo(
            f"{name}: {tree.root} ({len(tree.units)} units, {len(tree.written)} files written)"
        )
        typer.echo(
            f"  build it with: cmake -S {tree.root} -B {tree.binary_dir} -G Ninja"
            f" && cmake --build {tree.binary_dir}"
        )


@app.command("list")
def list_command(
    manifest_path: ManifestArg,
    target: Annotated[TargetChoice, typer.Option("--target")] = TargetChoice.all,
    as_json: JsonOption = False,
) -> None:
    """List every kernel the manifest would build, per target."""
    manifest = _load(manifest_path)
    listing = {
        name: [
            {**kernel.to_json(), "unit": unit.stem}
            for unit in translation_units(manifest, name)
            for kernel in unit.kernels
        ]
        for name in _targets_for(manifest, target)
    }
    if as_json:
        typer.echo(json.dumps({"library": manifest.library, "targets": listing}, indent=2))
        return
    for name, kernels in listing.items():
        typer.echo(f"{name}: {len(kernels)} kernels")
        for kernel in kernels:
            params = " ".join(f"{k}={v}" for k, v in kernel["params"].items())
            typer.echo(
                f"  {kernel['name']:<44} {kernel['dtype']:<9} {params:<12} {kernel['variant']}"
            )


@app.command()
def commands(
    manifest_path: ManifestArg,
    target: Annotated[TargetChoice, typer.Option("--target")] = TargetChoice.metal,
    build_dir: BuildDirOption = Path("build"),
) -> None:
    """Print the exact compiler commands of a target's build (`ninja -t commands`)."""
    manifest = _load(manifest_path)
    for name in _targets_for(manifest, target):
        tree = generate(manifest, name, build_dir)
        configure(tree)
        for line in ninja_commands(tree):
            typer.echo(line)


@app.command()
def clean(
    manifest_path: Annotated[
        Path | None, typer.Argument(help="Clean only this manifest's library.")
    ] = None,
    build_dir: BuildDirOption = Path("build"),
    dist: Annotated[
        bool, typer.Option("--dist", help="Also remove the published artifacts.")
    ] = False,
    out: OutOption = Path("dist"),
) -> None:
    """Remove build trees (and with --dist, published artifacts)."""
    if manifest_path is None:
        doomed = [build_dir] + ([out] if dist else [])
    else:
        manifest = _load(manifest_path)
        doomed = [build_dir / manifest.library]
        if dist:
            doomed += [p for p in out.glob(f"{manifest.library}.*") if p.is_file()]
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        typer.echo(f"removed {path}")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A .metallib or a CUDA fatbin.", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    """Show what a metallib or fatbin holds: header facts, functions, constants, archs."""
    from aotc.inspect import inspect_file, render_inspection

    data = inspect_file(path)
    typer.echo(json.dumps(data, indent=2) if as_json else render_inspection(data))


@app.command("verify")
def verify_command(
    manifest_path: ManifestArg,
    dist: Annotated[Path, typer.Option("--dist", help="Where the artifacts are.")] = Path("dist"),
    target: Annotated[TargetChoice, typer.Option("--target")] = TargetChoice.all,
    as_json: JsonOption = False,
) -> None:
    """Check dist/ against MANIFEST and the installed MLX; the exit code tells what failed."""
    from aotc.verify import verdict_of, verify

    manifest = _load(manifest_path)
    reports = verify(manifest, dist, _targets_for(manifest, target))
    verdict = verdict_of(reports)
    if as_json:
        body = {
            "verdict": verdict.name,
            "code": int(verdict),
            "targets": [r.to_json() for r in reports],
        }
        typer.echo(json.dumps(body, indent=2))
    else:
        for report in reports:
            state = "ok" if not report.problems else "FAILED"
            typer.echo(
                f"{report.target}: {report.artifact}: {state} ({report.kernels_checked} kernels)"
            )
            for code, message in report.problems:
                typer.echo(f"  {code.name}: {message}")
    raise typer.Exit(int(verdict))


@app.command()
def wheel(
    manifest_path: ManifestArg,
    dist: Annotated[Path, typer.Option("--dist", help="Where `aotc build` put artifacts.")] = Path(
        "dist"
    ),
    out: Annotated[Path, typer.Option("--out", help="Where the wheels go.")] = Path("dist"),
    name: Annotated[
        str | None, typer.Option("--name", help="Distribution name (default: aotc-lib-<library>).")
    ] = None,
    version: Annotated[str, typer.Option("--version", help="The wheels' version.")] = "0.1.0",
    target: Annotated[TargetChoice, typer.Option("--target")] = TargetChoice.all,
) -> None:
    """One platform-tagged wheel per built target, found at run time through its entry point."""
    from aotc.packaging.wheel import build_wheels

    targets = None if target == TargetChoice.all else [target.value]
    for path in build_wheels(
        manifest_path, dist=dist, out=out, name=name, version=version, targets=targets, report=_err
    ):
        typer.echo(str(path))


@app.command()
def bundle(
    manifest_path: ManifestArg,
    into: Annotated[
        Path, typer.Option("--into", help="An .app (Contents/Resources/aotc) or a folder.")
    ],
    dist: Annotated[Path, typer.Option("--dist", help="Where `aotc build` put artifacts.")] = Path(
        "dist"
    ),
    target: Annotated[
        TargetChoice | None, typer.Option("--target", help="Default: metal for an .app, else all.")
    ] = None,
) -> None:
    """Lay the built artifacts and indexes into an app bundle's resources or a folder."""
    from aotc.packaging.bundle import lay_bundle

    targets = None if target in (None, TargetChoice.all) else [target.value]
    for path in lay_bundle(manifest_path, into=into, dist=dist, targets=targets, report=_err):
        typer.echo(str(path))


@app.command("libraries")
def libraries_command(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Load these first, as aotc.load() does.", show_default=False),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """The prebuilt libraries aotc finds, in search order, and why any cannot be used here."""
    from aotc.runtime.libraries import describe, load, render

    for path in paths or []:
        load(path)
    entries = describe()
    typer.echo(json.dumps(entries, indent=2) if as_json else render(entries))


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"aotc {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True)
    ] = False,
) -> None:
    """aotc command line."""


def main() -> None:
    try:
        app()
    except AotcError as exc:
        _err(f"error: {exc}")
        raise SystemExit(exc.exit_code) from None
