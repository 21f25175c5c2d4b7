"""Shipping artifacts: `aotc wheel`, the hatchling build hook, `aotc bundle`, found at run time."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.metadata import Metadata
from packaging.tags import Tag
from packaging.utils import parse_wheel_filename
from wheel.wheelfile import WheelFile

from aotc.artifact import Index, make_index, publish, read_index
from aotc.codegen import translation_units
from aotc.families.base import kernels_dir
from aotc.manifest import load_manifest
from aotc.mlx_info import mlx_version
from aotc.packaging import PackagingError, platform_tags
from aotc.packaging.bundle import lay_bundle
from aotc.packaging.wheel import build_wheels, hatchling_build
from aotc.runtime import libraries as registry

from .conftest import needs_nvcc

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "downstream"
MANIFEST = """
library: tiny_sdpa
targets:
  metal: {sdk: macosx, deployment_target: "14.2"}
  cuda: {archs: [sm_90a], ptx: null}
kernels:
  - family: sdpa_vector
    dtypes: [float16]
    head_dims: [64]
"""
# A tiny kernel per name of the manifest: a real fatbin, made in seconds, whose entry points have
# the names the index records.
TINY_CU = """
extern "C" __global__ void sdpa_vector_float16_t_64_64(float* x) { x[threadIdx.x] += 1.0f; }
extern "C" __global__ void sdpa_vector_2pass_1_float16_t_64_64(float* x) { x[threadIdx.x] *= 2; }
extern "C" __global__ void sdpa_vector_2pass_2_float16_t_64(float* x) { x[threadIdx.x] -= 3.0f; }
"""
CUDA_TAGS = {
    Tag("py3", "none", "manylinux_2_28_x86_64"),
    Tag("py3", "none", "manylinux_2_28_aarch64"),
}


def publish_library(manifest_path: Path, dist: Path, target: str, artifact_bytes: bytes) -> Index:
    """What `aotc build` would publish, with a given artifact (the index is exact otherwise)."""
    manifest = load_manifest(manifest_path)
    scratch = dist.parent / f"scratch-{target}"
    scratch.mkdir(parents=True, exist_ok=True)
    suffix = {"cuda": ".fatbin", "metal": ".metallib"}[target]
    artifact = scratch / f"{manifest.library}{suffix}"
    artifact.write_bytes(artifact_bytes)
    index = make_index(
        library=manifest.library,
        target=target,
        artifact=artifact,
        kernels=[k.to_json() for u in translation_units(manifest, target) for k in u.kernels],
        options=manifest.targets[target].to_json(),
        toolchain={"name": "test", "version": "0"},
        flags=manifest.targets[target].compile_flags(),
        mlx_version=mlx_version(),
        headers_sha256={},
    )
    _, index_path = publish(artifact, index, dist)
    return read_index(index_path)


@pytest.fixture(scope="module")
def tiny_fatbin(tmp_path_factory) -> bytes:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    folder = tmp_path_factory.mktemp("fatbin")
    (folder / "tiny.cu").write_text(TINY_CU)
    subprocess.run(
        ["nvcc", "-fatbin", "-arch=sm_90a", "tiny.cu", "-o", "tiny.fatbin"],
        cwd=folder,
        check=True,
        capture_output=True,
    )
    return (folder / "tiny.fatbin").read_bytes()


@pytest.fixture
def manifest_path(tmp_path) -> Path:
    path = tmp_path / "manifest.yaml"
    path.write_text(textwrap.dedent(MANIFEST).lstrip())
    return path


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    monkeypatch.delenv("AOTC_PATH", raising=False)
    monkeypatch.delenv("RESOURCEPATH", raising=False)
    registry.reset()
    yield
    registry.reset()


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv that sees this interpreter's packages (mlx) and, through PYTHONPATH, aotc."""
    folder = tmp_path_factory.mktemp("venv")
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(folder)],
        check=True,
    )
    # --system-site-packages shows the *base* interpreter's packages; when this interpreter is
    # itself a venv (as on the GPU machine), its own site-packages (mlx) must be added too.
    python = folder / "bin" / "python"
    site_dir = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # addsitedir (not a bare path) so the parent's own .pth files run too: an editable aotc
    # installs its import hook that way.
    lines = [f"import site; site.addsitedir({p!r})" for p in site.getsitepackages()]
    Path(site_dir, "_aotc_test_parent.pth").write_text("\n".join(lines) + "\n")
    return python


def pip_install(python: Path, wheel: Path) -> None:
    argv = [sys.executable, "-m", "pip", "--python", str(python), "install"]
    subprocess.run([*argv, "--no-deps", "--no-index", "-q", str(wheel)], check=True)


def run_in(python: Path, script: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("AOTC_PATH", None)
    done = subprocess.run(
        [str(python), "-c", textwrap.dedent(script)],
        env=env,
        cwd=python.parents[2],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_wheel(path: Path) -> tuple[Metadata, configparser.ConfigParser, dict[str, bytes]]:
    """Metadata, entry points and files of a wheel, every RECORD hash verified on read."""
    with WheelFile(path) as wheel:  # raises on a file whose hash differs from RECORD
        files = {
            info.filename: wheel.read(info.filename)
            for info in wheel.infolist()
            if not info.filename.endswith("RECORD")
        }
    info = next(name.split("/")[0] for name in files if name.endswith(".dist-info/METADATA"))
    metadata = Metadata.from_email(files[f"{info}/METADATA"], validate=True)
    entry_points = configparser.ConfigParser()
    entry_points.read_string(files[f"{info}/entry_points.txt"].decode())
    wheel_file = files[f"{info}/WHEEL"].decode()
    assert "Root-Is-Purelib: false" in wheel_file
    return metadata, entry_points, files


@pytest.mark.slow
def test_cuda_wheel_installs_and_is_found_through_its_entry_point(
    tiny_fatbin, manifest_path, tmp_path, venv
):
    index = publish_library(manifest_path, tmp_path / "dist", "cuda", tiny_fatbin)
    lines: list[str] = []
    (wheel,) = build_wheels(
        manifest_path, dist=tmp_path / "dist", out=tmp_path / "wheels", report=lines.append
    )
    assert any("skipping metal" in line for line in lines)  # no Metal build here
    name, version, _, tags = parse_wheel_filename(wheel.name)
    assert (name, str(version), set(tags)) == ("aotc-lib-tiny-sdpa", "0.1.0", CUDA_TAGS)
    metadata, entry_points, files = check_wheel(wheel)
    assert (metadata.name, str(metadata.version)) == ("aotc-lib-tiny-sdpa", "0.1.0")
    assert [str(r) for r in metadata.requires_dist] == [f"mlx=={mlx_version()}"]
    assert dict(entry_points["aotc.libraries"]) == {"tiny_sdpa": "aotc_lib_tiny_sdpa"}
    assert files["aotc_lib_tiny_sdpa/tiny_sdpa.fatbin"] == tiny_fatbin
    assert json.loads(files["aotc_lib_tiny_sdpa/tiny_sdpa.cuda.json"]) == index.data
    assert "aotc_lib_tiny_sdpa/__init__.py" in files

    pip_install(venv, wheel)
    found = run_in(
        venv,
        """
        import hashlib, json
        from aotc.runtime.libraries import libraries
        (lib,) = [lib for lib in libraries() if lib.name == "tiny_sdpa"]
        print(json.dumps({"origin": lib.origin, "path": str(lib.path), "problems": lib.problems,
                          "sha": hashlib.sha256(lib.artifact_bytes()).hexdigest(),
                          "kernels": sorted(lib.kernel_names)}))
        """,
    )
    assert found["origin"] == "entry point aotc-lib-tiny-sdpa:tiny_sdpa"
    assert "site-packages/aotc_lib_tiny_sdpa/tiny_sdpa.cuda.json" in found["path"]
    assert found["sha"] == index.data["artifact"]["sha256"]
    assert found["kernels"] == sorted(index.kernel_names)
    # Nothing but the GPU can be missing here: the MLX version and the files are right.
    assert all("cuda backend" in problem for problem in found["problems"])


def test_metal_wheel_is_tagged_with_the_deployment_target(manifest_path, tmp_path):
    publish_library(manifest_path, tmp_path / "dist", "metal", b"MTLB fake metallib")
    (wheel,) = build_wheels(
        manifest_path,
        dist=tmp_path / "dist",
        out=tmp_path / "wheels",
        name="my-kernels",
        version="2.1",
        targets=["metal"],
    )
    name, version, _, tags = parse_wheel_filename(wheel.name)
    # pip matches macOS 11+ by major version only: 14.2 ships as macosx_14_0.
    assert (name, str(version), set(tags)) == (
        "my-kernels",
        "2.1",
        {Tag("py3", "none", "macosx_14_0_arm64")},
    )
    _, entry_points, files = check_wheel(wheel)
    assert dict(entry_points["aotc.libraries"]) == {"tiny_sdpa": "my_kernels"}
    assert files["my_kernels/tiny_sdpa.metallib"] == b"MTLB fake metallib"


def test_platform_tags_per_sdk(tmp_path):
    def index(target: str, **options) -> Index:
        return Index(tmp_path / f"x.{target}.json", {"target": target, "options": options})

    assert platform_tags(index("cuda")) == ("manylinux_2_28_x86_64", "manylinux_2_28_aarch64")
    assert platform_tags(index("metal", sdk="macosx", deployment_target="15")) == (
        "macosx_15_0_arm64",
    )
    assert platform_tags(index("metal", sdk="iphoneos", deployment_target="17.2")) == (
        "ios_17_2_arm64_iphoneos",
    )
    with pytest.raises(PackagingError, match="aotc bundle"):
        platform_tags(index("metal", sdk="xros", deployment_target="1.0"))


def test_wheel_refuses_a_stale_or_foreign_dist(manifest_path, tmp_path):
    dist = tmp_path / "dist"
    with pytest.raises(PackagingError, match="run `aotc build"):
        build_wheels(manifest_path, dist=dist, out=tmp_path / "w")
    index = publish_library(manifest_path, dist, "cuda", b"fatbin")
    index.artifact_path.write_bytes(b"rebuilt without its index")
    with pytest.raises(PackagingError, match="does not match the checksum"):
        build_wheels(manifest_path, dist=dist, out=tmp_path / "w")
    data = {**index.data, "kernels": index.data["kernels"][:1]}
    index.artifact_path.write_bytes(b"fatbin")
    index.path.write_text(json.dumps(data))
    with pytest.raises(PackagingError, match="lacks 6 kernels"):
        build_wheels(manifest_path, dist=dist, out=tmp_path / "w")
    with pytest.raises(PackagingError, match=r"metal\.json is missing"):
        build_wheels(manifest_path, dist=dist, out=tmp_path / "w", targets=["metal"])
    with pytest.raises(PackagingError, match="not a PEP 440 version"):
        build_wheels(manifest_path, dist=dist, out=tmp_path / "w", version="one")
    assert not (tmp_path / "w").exists()


def hatch_project(tmp_path: Path, manifest_path: Path, dist: Path, entry_points: str) -> Path:
    project = tmp_path / "project"
    (project / "src" / "proj").mkdir(parents=True)
    (project / "src" / "proj" / "__init__.py").write_text("")
    shutil.copy(manifest_path, project / "manifest.yaml")
    (project / "hatch_build.py").write_text(
        "from aotc.packaging.hatch_hook import AotcBuildHook\n\n"
        "def get_build_hook():\n    return AotcBuildHook\n"
    )
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["hatchling"]
            build-backend = "hatchling.build"
            [project]
            name = "proj"
            version = "1.0"
            {entry_points}
            [tool.hatch.build.hooks.custom]
            prebuilt = {json.dumps(str(dist))}
            targets = ["cuda"]
            """
        )
    )
    return project


def test_build_hook_ships_prebuilt_artifacts_and_checks_the_entry_point(manifest_path, tmp_path):
    dist = tmp_path / "dist"
    publish_library(manifest_path, dist, "cuda", b"fatbin bytes")
    project = hatch_project(tmp_path, manifest_path, dist, "")
    done = hatchling_build(project, tmp_path / "out")
    assert done.returncode != 0
    assert '`tiny_sdpa = "aotc_lib_tiny_sdpa"`' in done.stderr

    entry = '[project.entry-points."aotc.libraries"]\ntiny_sdpa = "aotc_lib_tiny_sdpa"'
    project = hatch_project(tmp_path / "again", manifest_path, dist, entry)
    done = hatchling_build(project, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    wheel = tmp_path / "out" / done.stdout.split()[-1]
    assert set(parse_wheel_filename(wheel.name)[3]) == CUDA_TAGS
    _, entry_points, files = check_wheel(wheel)
    assert {"proj/__init__.py", "aotc_lib_tiny_sdpa/tiny_sdpa.fatbin"} <= set(files)
    assert dict(entry_points["aotc.libraries"]) == {"tiny_sdpa": "aotc_lib_tiny_sdpa"}


@pytest.mark.slow
@needs_nvcc
def test_downstream_example_builds_its_kernels_into_its_wheel(tmp_path, venv):
    """`python -m build --wheel` of examples/downstream: the hook runs aotc's CUDA build."""
    if not (kernels_dir() / "cuda" / "sdpa_vector.cuh").is_file():
        pytest.skip("kernels/cuda/sdpa_vector.cuh is not written yet")
    project = tmp_path / "downstream"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("build", "dist"))
    # Hatchling finds the plugin through the `hatch` entry point group of an installed aotc;
    # a dist-info on PYTHONPATH stands for it when this checkout is not installed.
    shim = tmp_path / "shim" / "aotc-0.1.0.dist-info"
    shim.mkdir(parents=True)
    (shim / "METADATA").write_text("Metadata-Version: 2.1\nName: aotc\nVersion: 0.1.0\n")
    (shim / "entry_points.txt").write_text("[hatch]\naotc = aotc.packaging.hatch_hook\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim.parent), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", "wheels", "."],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "aotc: building downstream_sdpa for cuda" in done.stdout + done.stderr
    (wheel,) = (project / "wheels").glob("*.whl")
    name, _, _, tags = parse_wheel_filename(wheel.name)
    assert (name, set(tags)) == ("downstream-sdpa", CUDA_TAGS)
    _, entry_points, files = check_wheel(wheel)
    assert dict(entry_points["aotc.libraries"]) == {"downstream_sdpa": "aotc_lib_downstream_sdpa"}
    index = json.loads(files["aotc_lib_downstream_sdpa/downstream_sdpa.cuda.json"])
    assert {k["name"] for k in index["kernels"]} == {
        "sdpa_vector_float16_t_192_128",
        "sdpa_vector_2pass_1_float16_t_192_128",
        "sdpa_vector_wgmma_float16_t_192_128",
        "sdpa_vector_wgmma_short_float16_t_192_128",
        "sdpa_vector_2pass_fused_float16_t_192_128",
        "sdpa_vector_rows_float16_t_192_128",
        "sdpa_vector_rows_2pass_1_float16_t_192_128",
        "sdpa_vector_rows_2pass_fused_float16_t_192_128",
        "sdpa_vector_2pass_2_float16_t_128",
    }
    assert "downstream_sdpa/__init__.py" in files

    pip_install(venv, wheel)
    found = run_in(
        venv,
        """
        import json, downstream_sdpa
        print(json.dumps({"found": downstream_sdpa.kernels_found()}))
        """,
    )
    assert found == {"found": True}


def test_bundle_in_an_app_is_found_from_the_frozen_app(manifest_path, tmp_path, monkeypatch):
    dist = tmp_path / "dist"
    publish_library(manifest_path, dist, "metal", b"metallib")
    publish_library(manifest_path, dist, "cuda", b"fatbin")
    app = tmp_path / "My.app"
    written = lay_bundle(manifest_path, into=app, dist=dist)
    resources = app / "Contents" / "Resources" / "aotc"
    assert written == [resources / "tiny_sdpa.metal.json"]  # a Mac needs only Metal
    assert sorted(p.name for p in resources.iterdir()) == [
        "tiny_sdpa.metal.json",
        "tiny_sdpa.metallib",
    ]

    monkeypatch.setattr(sys, "executable", str(app / "Contents" / "MacOS" / "My"))
    (library,) = registry.libraries(refresh=True)
    assert (library.name, library.target, library.origin) == ("tiny_sdpa", "metal", "bundle My.app")
    assert library.artifact_bytes() == b"metallib"


def test_bundle_for_pyinstaller_datas_is_found_under_meipass(manifest_path, tmp_path, monkeypatch):
    dist = tmp_path / "dist"
    publish_library(manifest_path, dist, "cuda", b"fatbin")
    meipass = tmp_path / "_MEI123"
    # a spec's `datas=[("kernels", "aotc")]` lands the folder as _MEIPASS/aotc
    lay_bundle(manifest_path, into=meipass / "aotc", dist=dist)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(meipass), raising=False)
    monkeypatch.setattr(sys, "executable", str(meipass / "myapp"))
    (library,) = registry.libraries(refresh=True)
    assert (library.name, library.origin) == ("tiny_sdpa", "bundle PyInstaller")
    assert library.artifact_bytes() == b"fatbin"


def test_bundle_for_py2app_is_found_under_resourcepath(manifest_path, tmp_path, monkeypatch):
    dist = tmp_path / "dist"
    publish_library(manifest_path, dist, "cuda", b"fatbin")
    lay_bundle(manifest_path, into=tmp_path / "Resources" / "aotc", dist=dist, targets=["cuda"])
    monkeypatch.setenv("RESOURCEPATH", str(tmp_path / "Resources"))
    assert [lib.origin for lib in registry.libraries(refresh=True)] == ["bundle py2app"]
