"""The library registry: search order, usability checks, lazy checksums, `aotc libraries`."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from aotc.artifact import make_index, publish, read_index
from aotc.mlx_info import mlx_version
from aotc.runtime import libraries as registry
from aotc.runtime.libraries import CorruptArtifact, describe, find, libraries, load, render

# These tests load unusable libraries on purpose; load() warns about each (tested in test_api).
pytestmark = pytest.mark.filterwarnings("ignore:aotc.*cannot be used here:RuntimeWarning")

MLX = mlx_version()
K1 = "sdpa_vector_float16_t_192_128"
K2 = "sdpa_vector_2pass_1_float16_t_192_128"
K3 = "sdpa_vector_2pass_2_float16_t_128"


def kernel(name: str) -> dict:
    return {"name": name, "family": "sdpa_vector", "dtype": "float16", "params": {}, "variant": ""}


def make_library(
    folder: Path,
    library: str = "extra_sdpa",
    target: str = "cuda",
    names: tuple[str, ...] = (K1, K2, K3),
    *,
    mlx: str | None = MLX,
    headers: str | None = None,
    sources: str | None = None,
    options: dict | None = None,
    payload: bytes | None = None,
) -> Path:
    """Publish a small artifact and its index into `folder`; returns the index path."""
    suffix = {"cuda": ".fatbin", "metal": ".metallib"}.get(target, ".bin")
    scratch = folder / ".scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    artifact = scratch / f"{library}{suffix}"
    artifact.write_bytes(payload or f"{library} {target} {names}".encode())
    index = make_index(
        library=library,
        target=target,
        artifact=artifact,
        kernels=[kernel(name) for name in names],
        options=options or {},
        toolchain={"name": "test", "version": "0"},
        flags=[],
        mlx_version=mlx,
        headers_sha256={
            origin: digest for origin, digest in (("mlx", headers), ("aotc", sources)) if digest
        },
    )
    _, index_path = publish(artifact, index, folder)
    return index_path


class Backends:
    """Stands in for `mlx.core.<backend>.is_available()`."""

    def __init__(self, *available: str) -> None:
        self.available = set(available)

    def __call__(self, target: str) -> bool:
        return target in self.available

    def cache_clear(self) -> None:
        pass


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    monkeypatch.delenv("AOTC_PATH", raising=False)
    monkeypatch.delenv("RESOURCEPATH", raising=False)
    registry.reset()
    yield
    registry.reset()


@pytest.fixture
def backends(monkeypatch) -> Backends:
    fake = Backends("cuda")
    monkeypatch.setattr(registry, "_availability", fake)
    return fake


def fake_wheel(site: Path, dist: str, entry_name: str, value: str, files_from: Path | None) -> None:
    """An installed distribution declaring an `aotc.libraries` entry point (as a wheel leaves)."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[aotc.libraries]\n{entry_name} = {value}\n")
    if files_from is not None:
        package = site / value.split(":")[0]
        package.mkdir()
        (package / "__init__.py").write_text("")
        for path in files_from.iterdir():
            if path.is_file():
                (package / path.name).write_bytes(path.read_bytes())


def test_load_takes_an_index_an_artifact_or_a_folder_in_call_order(tmp_path, backends):
    a = make_library(tmp_path / "a", "lib_a")
    b = make_library(tmp_path / "b", "lib_b")
    c = make_library(tmp_path / "c", "lib_c")
    make_library(tmp_path / "c", "lib_c", "metal")
    assert load(a).name == "lib_a"
    assert load(tmp_path / "b" / "lib_b.fatbin").path == b  # the index beside the artifact
    folder = load(tmp_path / "c")  # the folder's usable library comes back
    assert (folder.name, folder.target, folder.path) == ("lib_c", "cuda", c)
    found = libraries()
    assert [(lib.name, lib.target) for lib in found] == [
        ("lib_a", "cuda"),
        ("lib_b", "cuda"),
        ("lib_c", "cuda"),
        ("lib_c", "metal"),
    ]
    assert {lib.origin for lib in found} == {"aotc.load()"}
    load(a)  # loading again keeps its place
    assert [lib.name for lib in libraries()][:2] == ["lib_a", "lib_b"]


def test_load_refuses_what_is_not_a_library(tmp_path):
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / "orphan.fatbin").write_bytes(b"x")
    with pytest.raises(registry.BadIndex, match="unsupported index schema"):
        load(tmp_path / "notes.json")
    with pytest.raises(registry.BadIndex, match="no index beside"):
        load(tmp_path / "orphan.fatbin")
    with pytest.raises(registry.BadIndex, match="no such file"):
        load(tmp_path / "absent.cuda.json")
    with pytest.raises(registry.BadIndex, match="no aotc index found"):
        load(tmp_path)


def test_search_order_and_the_first_usable_provider_serves(tmp_path, monkeypatch, backends):
    explicit = make_library(tmp_path / "explicit", "mine", mlx="0.0.1")  # unusable here
    env_1 = make_library(tmp_path / "env1", "from_env")
    env_2 = make_library(tmp_path / "env2", "from_env_2")
    site = tmp_path / "site"
    fake_wheel(site, "zz-kernels", "zz", "zz_kernels", make_library(tmp_path / "w1", "zz").parent)
    fake_wheel(site, "aa-kernels", "aa", "aa_kernels", make_library(tmp_path / "w2", "aa").parent)
    meipass = tmp_path / "frozen"
    make_library(meipass / "aotc", "bundled")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("AOTC_PATH", os.pathsep.join([str(env_1), str(env_2.parent)]))
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(meipass), raising=False)

    load(explicit)
    found = [(lib.name, lib.origin) for lib in libraries()]
    assert found == [
        ("mine", "aotc.load()"),
        ("from_env", "AOTC_PATH"),
        ("from_env_2", "AOTC_PATH"),
        ("aa", "entry point aa-kernels:aa"),  # sorted by distribution name
        ("zz", "entry point zz-kernels:zz"),
        ("bundled", "bundle PyInstaller"),
    ]
    assert libraries()[0].problems == (f"built for MLX 0.0.1, installed is MLX {MLX}",)
    # Every one provides K1: the first usable one in the order serves it.
    assert find("cuda", [K1, K3]).name == "from_env"
    assert find("metal", [K1]) is None
    assert find("cuda", [K1, "sdpa_vector_float16_t_64_64"]) is None
    entries = {entry["name"]: entry for entry in describe()}
    assert entries["from_env"]["serves"] == 3 and entries["from_env"]["shadowed"] == {}
    assert entries["aa"]["serves"] == 0
    assert entries["aa"]["shadowed"][K1].startswith("from_env (AOTC_PATH, ")
    assert entries["mine"]["usable"] is False
    assert "from_env" in json.dumps(describe())


def test_a_library_of_another_backend_is_listed_with_the_reason(tmp_path, backends):
    backends.available = set()
    load(make_library(tmp_path, "extra_sdpa", "cuda"))
    (library,) = libraries()
    assert not library.usable
    assert library.problems == (
        "this MLX has no cuda backend available here (mlx.core.cuda.is_available() is not True)",
    )
    assert find("cuda", [K1]) is None
    text = render(describe())
    assert "extra_sdpa [cuda] 3 kernels, not usable" in text
    assert "no cuda backend" in text


def test_the_real_backend_check_follows_this_mlx(tmp_path):
    import mlx.core as mx

    load(make_library(tmp_path, "extra_sdpa", "cuda"))
    has_cuda = bool(getattr(getattr(mx, "cuda", None), "is_available", lambda: False)())
    assert libraries()[0].usable is has_cuda


def test_missing_artifact_unknown_target_and_unknown_family(tmp_path, backends):
    index = make_library(tmp_path / "a", "gone")
    read_index(index).artifact_path.unlink()
    load(index)
    odd = make_library(tmp_path / "b", "odd", "vulkan")
    load(odd)
    backends.available.add("metal")
    data = json.loads(make_library(tmp_path / "c", "strange", "metal").read_text())
    data["kernels"][0]["family"] = "flash_decoding"
    (tmp_path / "c" / "strange.metal.json").write_text(json.dumps(data))
    load(tmp_path / "c" / "strange.metal.json")
    gone, strange_target, strange_family = libraries()
    assert gone.problems == ("its artifact gone.fatbin is missing beside its index",)
    assert strange_target.problems == ("unknown target 'vulkan' (this aotc knows cuda and metal)",)
    assert "kernel family 'flash_decoding' is unknown" in strange_family.problems[-1]


def test_metal_needs_the_installed_mlx_headers(tmp_path, backends, monkeypatch):
    from aotc.verify import installed_header_digest

    backends.available = {"metal"}
    monkeypatch.setattr(registry.sys, "platform", "linux")  # no macOS version check here
    digest = installed_header_digest({"sdpa_vector"}, "metal")
    assert digest is not None  # MLX's headers are installed with mlx here
    load(make_library(tmp_path / "same", "same", "metal", headers=digest))
    load(make_library(tmp_path / "other", "other", "metal", headers="0" * 64))
    same, other = libraries()
    assert same.usable, same.problems
    assert other.problems == (
        "built against other MLX Metal kernel headers than the installed MLX's "
        "(rebuild it with this MLX)",
    )


def test_cuda_needs_this_aotcs_kernel_templates(tmp_path, backends):
    from aotc.verify import installed_header_digest

    digest = installed_header_digest({"sdpa_vector"}, "cuda", origin="aotc")
    assert digest is not None  # kernels/ of this checkout
    load(make_library(tmp_path / "same", "same", sources=digest))
    load(make_library(tmp_path / "other", "other", sources="0" * 64))
    load(make_library(tmp_path / "unrecorded", "unrecorded"))
    same, other, unrecorded = libraries()
    assert same.usable, same.problems
    assert unrecorded.usable, unrecorded.problems
    assert other.problems == (
        "built from other aotc kernel templates than this aotc's, which its launch plan may "
        "not fit (rebuild it with this aotc)",
    )


def test_without_mlx_headers_metal_is_checked_by_version(tmp_path, backends, monkeypatch):
    from aotc.families import FAMILIES

    backends.available = {"metal"}
    monkeypatch.setattr(registry.sys, "platform", "linux")

    def no_headers(target):
        raise FileNotFoundError("MLX's headers were not found")

    monkeypatch.setattr(FAMILIES["sdpa_vector"], "include_roots", no_headers)
    load(make_library(tmp_path, "frozen_app", "metal", headers="0" * 64))
    assert libraries()[0].usable


def test_a_mac_older_than_the_deployment_target_cannot_load_it(tmp_path, backends, monkeypatch):
    import platform

    backends.available = {"metal"}
    monkeypatch.setattr(registry.sys, "platform", "darwin")
    monkeypatch.setattr(platform, "mac_ver", lambda: ("14.1", ("", "", ""), "arm64"))
    monkeypatch.setattr(registry, "_metal_headers_problem", lambda index: None)
    options = {"sdk": "macosx", "deployment_target": "14.2"}
    load(make_library(tmp_path, "new", "metal", options=options))
    assert libraries()[0].problems == ("built for macOS 14.2 or newer, this Mac runs macOS 14.1",)


def test_artifact_bytes_are_read_once_and_checked(tmp_path, backends, monkeypatch):
    index = make_library(tmp_path / "a", "first", payload=b"first payload")
    make_library(tmp_path / "b", "second")
    monkeypatch.setenv("AOTC_PATH", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    first = find("cuda", [K1])
    assert first.name == "first"
    assert first.artifact_bytes() == b"first payload"
    artifact = read_index(index).artifact_path
    artifact.write_bytes(b"changed under us")
    assert first.artifact_bytes() == b"first payload"  # read once per process

    registry.reset()
    monkeypatch.setattr(registry, "_availability", backends)
    first = find("cuda", [K1])
    expected = hashlib.sha256(b"first payload").hexdigest()[:16]
    with (
        pytest.warns(RuntimeWarning, match=f"its index says {expected}"),
        pytest.raises(CorruptArtifact, match="replaced or damaged"),
    ):
        first.artifact_bytes()
    assert not first.usable
    with pytest.raises(CorruptArtifact):
        first.artifact_bytes()
    assert find("cuda", [K1]).name == "second"  # the next provider serves from now on


def test_broken_sources_are_reported_not_raised(tmp_path, monkeypatch, backends):
    site = tmp_path / "site"
    fake_wheel(site, "broken-kernels", "broken", "no_such_module_aotc_test", None)
    folder = tmp_path / "custom"
    make_library(folder, "by_attr")
    (site / "attr_kernels.py").write_text(f"def where():\n    return {str(folder)!r}\n")
    fake_wheel(site, "attr-kernels", "by_attr", "attr_kernels:where", None)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.cuda.json").write_text('{"schema": 99}')
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("AOTC_PATH", os.pathsep.join([str(tmp_path / "bad"), str(tmp_path / "no")]))
    assert [(lib.name, lib.origin) for lib in libraries()] == [
        ("by_attr", "entry point attr-kernels:by_attr")
    ]
    problems = {entry["name"]: entry["problems"] for entry in describe() if not entry["usable"]}
    assert "unsupported index schema 99" in problems["x"][0]
    assert problems["no"] == ["no such file or folder"]
    assert "does not resolve" in problems["broken"][0]


def test_refresh_rediscovers(tmp_path, monkeypatch, backends):
    assert libraries() == []
    monkeypatch.setenv("AOTC_PATH", str(make_library(tmp_path, "late")))
    assert libraries() == []  # discovery is cached
    assert [lib.name for lib in libraries(refresh=True)] == ["late"]
    assert "no aotc libraries found" in render([])


def test_an_unreadable_index_in_a_loaded_folder_is_listed_last(tmp_path, backends):
    make_library(tmp_path, "good")
    (tmp_path / "broken.cuda.json").write_text("{ not json")
    load(tmp_path)
    entries = describe()
    assert [entry["name"] for entry in entries] == ["good", "broken"]
    broken = entries[-1]
    assert broken["usable"] is False and broken["kernels"] == 0 and broken["serves"] == 0
    assert broken["target"] is None and broken["artifact"] is None
    assert broken["path"] == str(tmp_path / "broken.cuda.json")
    assert len(broken["problems"]) == 1 and broken["problems"][0]
    assert "broken" in render(entries)
