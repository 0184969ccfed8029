"""The model package fits its one container (infra.container): what it vendors needs nothing the
image lacks, and what the serving code imports is in the image or in the archive."""

from __future__ import annotations

import ast
import email.parser
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from dermscore.template import load_template
from infra.container import CONTAINER, LOCAL_SERVE_TORCH, Container
from infra.package import PROJECT_PACKAGES, ROOT, SERVING_ENTRY, build_model_tarball, code_closure

# Import name -> distribution, for the container's packages whose names differ.
DISTRIBUTION_OF = {"PIL": "pillow", "yaml": "pyyaml"}


def unmet(metadata: str, container: Container = CONTAINER, unused: tuple[str, ...] = ()) -> list[str]:
    """What a distribution's METADATA asks for that the container (its packages + the vendored
    ones) does not give: Requires-Python, and every Requires-Dist whose marker holds there, but for
    the ``unused`` ones (the part of the distribution that ships never imports them)."""
    meta = email.parser.Parser().parsestr(metadata)
    name = meta["Name"]
    env = container.marker_environment()
    installed = {canonicalize_name(n): Version(v) for n, v in container.installed().items()}
    problems = []
    if meta["Requires-Python"] and Version(container.python) not in SpecifierSet(meta["Requires-Python"]):
        problems.append(f"{name}: Requires-Python {meta['Requires-Python']} excludes {container.python}")
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # an extra, or another platform / Python
        if canonicalize_name(req.name) in {canonicalize_name(u) for u in unused}:
            continue
        have = installed.get(canonicalize_name(req.name))
        if have is None:
            problems.append(f"{name}: needs {req}, which the container does not have")
        elif not req.specifier.contains(have, prereleases=True):
            problems.append(f"{name}: needs {req}, the container has {req.name} {have}")
    return problems


@pytest.fixture(scope="module")
def archive(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tarball = build_model_tarball(tiny_model, tmp_path_factory.mktemp("container") / "model.tar.gz")
    with tarfile.open(tarball) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_every_vendored_distribution_is_satisfied_by_the_container(archive: dict[str, bytes]) -> None:
    metadata = {n: d.decode() for n, d in archive.items()
                if n.startswith("code/lib/") and n.endswith(".dist-info/METADATA")}
    parsed = [email.parser.Parser().parsestr(m) for m in metadata.values()]
    shipped = {canonicalize_name(m["Name"]): m["Version"] for m in parsed}
    assert shipped == {canonicalize_name(w.name): w.version for w in CONTAINER.vendored + CONTAINER.binary}
    # The container's Python gets its own copy of each binary distribution.
    binary = {f"code/lib/{w.tag}/{w.name}-{w.version}.dist-info/METADATA" for w in CONTAINER.binary}
    assert binary <= set(metadata)
    assert any(w.python == CONTAINER.python_short for w in CONTAINER.binary)
    unused = {canonicalize_name(w.name): w.unused_requirements for w in CONTAINER.binary}
    assert [p for m in metadata.values()
            for p in unmet(m, unused=unused.get(canonicalize_name(email.parser.Parser().parsestr(m)["Name"]), ()))
            ] == []
    assert not any(n.endswith("requirements.txt") for n in archive)  # the toolkit pip-installs nothing


def test_the_check_refuses_what_the_container_cannot_satisfy() -> None:
    """monai 1.6.1 (torch>=2.8) is what made the old package fail; markers and extras are honoured."""
    monai_161 = "Name: monai\nVersion: 1.6.1\nRequires-Python: >=3.10\nRequires-Dist: torch>=2.8.0\n" \
                "Requires-Dist: numpy<3.0,>=1.24\nRequires-Dist: nibabel; extra == \"all\"\n"
    assert unmet(monai_161) == ["monai: needs torch>=2.8.0, the container has torch 2.6.0"]
    assert unmet("Name: x\nVersion: 1\nRequires-Python: >=3.13\n") == ["x: Requires-Python >=3.13 excludes 3.12.8"]
    assert unmet("Name: x\nVersion: 1\nRequires-Dist: tomli; python_version < \"3.11\"\n") == []
    assert unmet("Name: x\nVersion: 1\nRequires-Dist: pyarrow>=17\n") == [
        "x: needs pyarrow>=17, which the container does not have"]
    assert Marker('sys_platform == "linux" and platform_machine == "x86_64"').evaluate(CONTAINER.marker_environment())


def test_the_template_default_image_is_the_documented_container() -> None:
    params = load_template()["Parameters"]
    assert params["PyTorchImageTag"]["Default"] == CONTAINER.image_tag
    assert CONTAINER.image_tag.startswith(f"{CONTAINER.torch}-") and f"-py{CONTAINER.python_short.replace('.', '')}-" \
        in CONTAINER.image_tag


def third_party_imports(files: list[tuple[str, Path]]) -> set[str]:
    names: set[str] = set()
    for _, path in files:
        for node in ast.walk(ast.parse(path.read_bytes())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in PROJECT_PACKAGES and n != "__future__"}


def test_the_serving_code_imports_only_what_the_container_or_the_archive_has() -> None:
    have = {canonicalize_name(n) for n in CONTAINER.installed()}
    imported = third_party_imports(code_closure([SERVING_ENTRY])) - set(CONTAINER.never_imported_when_serving)
    missing = {n for n in imported if canonicalize_name(DISTRIBUTION_OF.get(n, n)) not in have}
    assert missing == set()


def test_project_pins_agree_with_the_container_table() -> None:
    """The serve venv's torch is the project's pin; the project's own lower bounds for the packages
    the image provides (Pillow, numpy, boto3) accept the image's versions."""
    deps = {canonicalize_name(Requirement(d).name): Requirement(d)
            for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert str(deps["torch"]) == LOCAL_SERVE_TORCH
    for name in ("pillow", "numpy", "boto3"):
        assert deps[name].specifier.contains(CONTAINER.provided[name]), (name, deps[name], CONTAINER.provided[name])


RUNTIME_CHECK = r'''
import json, sys
lib = sys.argv[1]
sys.path[:0] = [f"{lib}/cp{sys.version_info[0]}{sys.version_info[1]}", lib]
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
shape = [2 if isinstance(d, str) else d for d in session.get_inputs()[0].shape]
outputs = session.run(None, {session.get_inputs()[0].name: np.zeros(shape, np.uint8)})
print(json.dumps({"file": ort.__file__, "version": ort.__version__, "outputs": [list(o.shape) for o in outputs],
                  "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
'''


def test_the_vendored_runtime_runs_the_shipped_graph_without_what_it_leaves_out(archive: dict[str, bytes],
                                                                              tmp_path: Path) -> None:
    """This Python's copy of the trimmed onnxruntime (no C API library, no tools) imports and runs
    model.onnx, and never loads the requirements the table says it does not use."""
    import json
    import subprocess

    here = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    wheel = next((w for w in CONTAINER.binary if w.tag == here), None)
    if wheel is None:
        pytest.skip(f"no vendored runtime for Python {sys.version_info[0]}.{sys.version_info[1]}")
    for name, data in archive.items():
        if name.startswith(f"code/lib/{here}/") or name == "model.onnx":
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(data)
    assert not list((tmp_path / "code" / "lib" / here).rglob("libonnxruntime.so*"))
    proc = subprocess.run([sys.executable, "-c", RUNTIME_CHECK, str(tmp_path / "code" / "lib"),
                           str(tmp_path / "model.onnx")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert Path(got["file"]).resolve().is_relative_to(tmp_path.resolve()) and got["version"] == wheel.version
    assert [shape[0] for shape in got["outputs"]] == [2, 2, 2]   # logits, features, class maps
    unused = {u.replace("protobuf", "google") for u in wheel.unused_requirements}
    assert unused and not unused & set(got["loaded"])
