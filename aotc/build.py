"""Drives the generated CMake + Ninja build and publishes the artifact with its index."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from aotc.artifact import index_name, make_index, publish, sha256_file
from aotc.codegen import BuildTree, generate
from aotc.errors import BuildFailed, ToolchainMissing
from aotc.manifest import Manifest
from aotc.mlx_info import mlx_version
from aotc.targets import TARGETS

Reporter = Callable[[str], None]
_STATUS = re.compile(r"^\[(\d+)/(\d+)\] (?:aotc: )?(.*)$")


@dataclass(frozen=True)
class BuildResult:
    target: str
    artifact: Path
    index: Path
    compiled: tuple[str, ...]  # what Ninja ran ("compiling X for sm_90a", "linking ...")
    published: bool  # False when dist/ already held this exact artifact and index


def build_program(name: str) -> str:
    """cmake/ninja from their PyPI packages (dependencies of aotc), else from PATH."""
    try:
        module = __import__(name)
        directory = module.CMAKE_BIN_DIR if name == "cmake" else module.BIN_DIR
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(name)
    if found is None:
        raise ToolchainMissing(f"{name} was not found: `pip install {name}`")
    return found


def build_target(
    manifest: Manifest,
    target_name: str,
    *,
    out_dir: Path,
    build_dir: Path,
    jobs: int | None = None,
    verbose: bool = False,
    report: Reporter = lambda line: None,
) -> BuildResult:
    target = TARGETS[target_name]
    toolchain = target.find_toolchain()
    tree_dir = build_dir / manifest.library / target_name
    with locked(tree_dir):
        tree = generate(manifest, target_name, build_dir, toolchain)
        configure(tree)
        steps = _run_ninja(tree, jobs or os.cpu_count() or 1, verbose, report)
        artifact = tree.binary_dir / f"{tree.library}{target.artifact_suffix}"
        options = manifest.targets[target_name]
        index = make_index(
            library=tree.library,
            target=target_name,
            artifact=artifact,
            kernels=[kernel.to_json() for kernel in tree.kernels],
            options=options.to_json(),
            toolchain=toolchain.to_json(),
            flags=options.compile_flags(),
            mlx_version=mlx_version(),
            headers_sha256=tree.headers_sha256,
        )
        published = not _same_as_published(index, out_dir)
        artifact_dest, index_dest = (
            publish(artifact, index, out_dir)
            if published
            else (out_dir / artifact.name, out_dir / index_name(tree.library, target_name))
        )
    return BuildResult(target_name, artifact_dest, index_dest, tuple(steps), published)


def configure(tree: BuildTree) -> None:
    """Run CMake once; later, Ninja re-runs it by itself when CMakeLists.txt changes."""
    if (tree.binary_dir / "build.ninja").is_file():
        return
    argv = [
        build_program("cmake"),
        "-S",
        str(tree.root),
        "-B",
        str(tree.binary_dir),
        "-G",
        "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={build_program('ninja')}",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        raise BuildFailed(f"CMake could not configure {tree.root}:\n{done.stdout}{done.stderr}")


def ninja_commands(tree: BuildTree) -> list[str]:
    """The exact compiler command lines of the build, in order (`ninja -t commands`)."""
    argv = [build_program("ninja"), "-C", str(tree.binary_dir), "-t", "commands"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def _run_ninja(tree: BuildTree, jobs: int, verbose: bool, report: Reporter) -> list[str]:
    argv = [build_program("ninja"), "-C", str(tree.binary_dir), "-j", str(jobs)]
    if verbose:
        argv.append("-v")
    steps: list[str] = []
    output: list[str] = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            status = _STATUS.match(line.rstrip())
            if status and not status.group(3).startswith(("Re-running CMake", "Re-checking")):
                done, total, what = status.groups()
                steps.append(what)
                report(f"[{done}/{total}] {what}")
            elif verbose:
                report(line.rstrip())
    if proc.returncode:
        raise BuildFailed(_explain_failure(tree, "".join(output)))
    return steps


def _explain_failure(tree: BuildTree, output: str) -> str:
    """The compiler's message, headed by the unit and the manifest entries it came from."""
    failed = re.findall(r"^FAILED: (.*)$", output, re.MULTILINE)
    heads = []
    for outputs in failed:
        unit = _unit_of(tree, outputs)
        if unit is not None:
            origins = ", ".join(str(origin) for origin in unit.origins)
            heads.append(f"compiling {unit.stem} failed (from {origins})")
        else:
            heads.append(f"building {outputs.strip()} failed")
    body = re.sub(r"^\[\d+/\d+\] .*\n", "", output, flags=re.MULTILINE).strip()
    return "\n".join([*heads, "", body]) if heads else f"the build failed:\n{body}"


def _unit_of(tree: BuildTree, outputs: str):
    names = [Path(path).name for path in outputs.split()]
    matches = [unit for unit in tree.units for name in names if name.startswith(f"{unit.stem}.")]
    return max(matches, key=lambda unit: len(unit.stem), default=None)


def _same_as_published(index: dict, out_dir: Path) -> bool:
    """True when dist/ already holds this artifact with an index that differs only in time."""
    import json

    index_path = out_dir / index_name(index["library"], index["target"])
    artifact_path = out_dir / index["artifact"]["file"]
    if not (index_path.is_file() and artifact_path.is_file()):
        return False
    try:
        old = json.loads(index_path.read_text(encoding="utf-8"))
    except ValueError:
        return False
    strip = lambda d: {k: v for k, v in d.items() if k != "created"}  # noqa: E731
    return strip(old) == strip(index) and sha256_file(artifact_path) == index["artifact"]["sha256"]


@contextmanager
def locked(tree_dir: Path) -> Iterator[None]:
    """One build of a tree at a time; a second waits rather than corrupting the first."""
    tree_dir.mkdir(parents=True, exist_ok=True)
    with (tree_dir / ".aotc.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
