"""The command line's shared vocabulary: one name, type, default and help per option, one-line errors.

Every subcommand that takes a model folder, a HAM10000 folder, an image folder, a device or a
quiet switch adds it from here, so ``--model`` means the same in ``predict`` as in ``demo`` and
``--images`` is always a folder. A user's mistake (a folder that does not exist, a folder that
is not a model) is refused while the arguments are parsed, in one line that says what to do,
with exit status :data:`USAGE_ERROR`; a mistake found later raises :class:`UserError`, which
``dermscore.cli`` prints the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

USAGE_ERROR = 2        # the user's mistake: nothing was done
PARTIAL_FAILURE = 1    # some of the work failed (e.g. files that could not be scored)
# Strings, so that argparse checks them with the option's type like a value the user typed.
DEFAULT_MODEL = "models/default"
DEFAULT_DATA = "../shared/data/ham10000"
DEVICES = ("auto", "cpu", "cuda")
# Scoring runtimes (batch.runtime): auto = torch on CUDA, ONNX Runtime on the CPU when installed.
RUNTIMES = ("auto", "torch", "onnx")
MODEL_FILES = ("model.pt", "metadata.json")
CHECKOUT = Path(__file__).resolve().parents[1]   # the repository root, in a checkout


class UserError(Exception):
    """A mistake of the user's, found after parsing: printed as one line, exit status 2."""


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help (but not the defaults that say nothing:
    None, False, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not action.option_strings or action.default in (None, False, "", [],
                                                                                    argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (what is wrong and where to look) instead of usage + error."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------- argument types

def folder(value: str) -> Path:
    """An existing folder."""
    path = Path(value).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"folder {value} does not exist")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a file, not a folder")
    return path


def model_folder(value: str) -> Path:
    """A model folder: ``model.pt`` + ``metadata.json`` (what ``dermscore train`` writes). A relative
    path that is not here is also looked up from the checkout's root, so ``models/default`` works
    from any folder of a checkout."""
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists() and (CHECKOUT / path).is_dir():
        path = CHECKOUT / path
    path = folder(str(path))
    missing = [f for f in MODEL_FILES if not (path / f).is_file()]
    if missing:
        raise argparse.ArgumentTypeError(
            f"{value} is not a model folder (no {' or '.join(missing)}): pass --model with a folder that "
            f"`dermscore train` wrote, e.g. {DEFAULT_MODEL}")
    return path


# --------------------------------------------------------------------------- the shared options

def add_model(p: argparse.ArgumentParser, help_text: str = "model folder (model.pt + metadata.json)") -> None:
    p.add_argument("--model", type=model_folder, default=DEFAULT_MODEL, help=help_text)


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=folder, default=DEFAULT_DATA,
                   help="HAM10000 folder: a metadata CSV (image_id, dx, lesion_id) and the images below it")


def add_images(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--images", type=folder, default=None, metavar="FOLDER", help=help_text)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, default="auto", help="where the model runs (auto: cuda when present)")


def add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=RUNTIMES, default=None,
                   help="what runs the forward pass: torch, onnx, or auto (torch on cuda, onnx on the cpu when "
                        "installed); default: DERMSCORE_RUNTIME, else auto")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="the handlers' structured logs on the console too (else only in the log file)")
