"""The command line as a new user meets it: help everywhere, one vocabulary, one-line mistakes.

Every subcommand's ``--help`` works and every option says what it is; options that several
commands share have one name, type and default; a user's mistake (a missing folder, a folder
that is not a model, no images, a file that is not there) ends in one line on stderr that says
what to do, with exit status 2 and no traceback; a partial failure exits 1.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
from pathlib import Path

import pytest

from dermscore import __version__, options
from dermscore.cli import COMMANDS, main, parser

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
# Options that mean the same thing wherever they appear (dermscore.options): name -> what must agree.
SHARED = ("--model", "--data", "--images", "--device", "--quiet", "--json")


def subparser(name: str) -> argparse.ArgumentParser:
    top = parser(name)
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def options_of(name: str) -> dict[str, argparse.Action]:
    return {s: a for a in subparser(name)._actions for s in a.option_strings if s.startswith("--")}


@pytest.mark.parametrize("argv", [["--help"], ["-h"], *([c, "--help"] for c in COMMANDS)],
                         ids=lambda a: " ".join(a))
def test_help_works_for_the_root_and_every_command(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dermscore") and "Exit status:" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"dermscore {__version__}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help(command):
    for flag, action in options_of(command).items():
        if action.help is argparse.SUPPRESS or flag in ("--help",):
            continue
        assert action.help and action.help.strip(), f"dermscore {command} {flag} has no help text"


def test_shared_options_mean_the_same_in_every_command():
    seen: dict[str, dict[str, tuple]] = {}
    for command in COMMANDS:
        for flag, a in options_of(command).items():
            if flag in SHARED:
                seen.setdefault(flag, {})[command] = (type(a).__name__, a.type, a.choices, a.nargs)
    for flag, by_command in seen.items():
        assert len(set(by_command.values())) == 1, f"{flag} differs: {by_command}"
    # a count and a folder never share a name; --json is always a switch; the device defaults to auto
    assert all(options_of(c)["--images"].type is options.folder for c in seen["--images"])
    assert all(isinstance(options_of(c)["--json"], argparse._StoreTrueAction) for c in seen["--json"])
    assert {options_of(c)["--device"].default for c in seen["--device"]} == {"auto"}
    assert {options_of(c)["--model"].default for c in seen["--model"]} == {options.DEFAULT_MODEL}
    assert set(seen["--model"]) >= {"predict", "evaluate", "demo", "serve", "package-model", "bench"}


def test_train_never_writes_the_shipped_model_by_default(capsys):
    assert options_of("train")["--out"].required
    with pytest.raises(SystemExit) as exit_:
        main(["train"])
    assert exit_.value.code == options.USAGE_ERROR
    assert "--out" in capsys.readouterr().err


def one_line_error(capsys, argv: list[str], *expected: str) -> str:
    """Run ``argv`` as a user would; its exit status must be 2 and stderr one line, no traceback."""
    try:
        code = main(argv)
    except SystemExit as exc:   # refused while parsing
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == options.USAGE_ERROR, (argv, code, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, (text, err)
    return err


@pytest.fixture()
def not_a_model(tmp_path: Path) -> Path:
    folder = tmp_path / "notamodel"
    folder.mkdir()
    (folder / "README.md").write_text("no weights here\n")
    return folder


def test_a_missing_folder_says_so(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    one_line_error(capsys, ["evaluate", "--data", str(missing)], f"folder {missing} does not exist")
    one_line_error(capsys, ["train", "--data", str(missing), "--out", str(tmp_path / "m")], "does not exist")
    one_line_error(capsys, ["demo", "--images", str(missing)], "does not exist")
    one_line_error(capsys, ["report", "--images", str(missing)], "does not exist")


@pytest.mark.parametrize("command", ["predict", "evaluate", "package-model", "demo", "calibrate-ood", "bench"])
def test_a_folder_that_is_not_a_model_says_what_a_model_folder_is(capsys, not_a_model, command):
    argv = [command, "--model", str(not_a_model)] + ([str(SAMPLES / "ISIC_0024306.jpg")] if command == "predict"
                                                      else [])
    one_line_error(capsys, argv, "is not a model folder", "model.pt", "--model")


def test_a_data_folder_without_metadata_says_what_it_needs(capsys, tmp_path):
    (tmp_path / "images").mkdir()
    one_line_error(capsys, ["evaluate", "--data", str(tmp_path / "images")], "no HAM10000 metadata CSV", "--data")


def test_no_images_found(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(capsys, ["demo", "--images", str(empty)], f"no files in {empty}", "--images")
    one_line_error(capsys, ["bench", "--quick", "--images", str(empty)], "no .jpg/.jpeg/.png images", "--images")


def test_a_file_that_is_not_there(capsys, tmp_path):
    one_line_error(capsys, ["predict", str(tmp_path / "lesion.jpg")], "lesion.jpg is not a file")


def test_a_partial_failure_exits_1_and_says_how_many(capsys, tmp_path):
    good = tmp_path / "good.jpg"
    shutil.copyfile(sorted(SAMPLES.glob("*.jpg"))[0], good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert main(["predict", str(good), str(broken)]) == options.PARTIAL_FAILURE
    captured = capsys.readouterr()
    assert "1 of 2 files could not be scored" in captured.err and "Traceback" not in captured.err
    assert "good.jpg" in captured.out and "broken.jpg" in captured.out
    assert main(["predict", str(good)]) == 0


def test_the_formatter_shows_defaults_that_say_something():
    text = io.StringIO()
    subparser("plan").print_help(text)
    assert "(default: 300)" in text.getvalue()         # --batch-window
    assert "(default: None)" not in text.getvalue() and "(default: False)" not in text.getvalue()


def test_an_installed_dermscore_finds_its_template_outside_the_checkout(tmp_path):
    """The wheel carries template.yaml (package data): `plan` and `query --list` work from any folder."""
    import subprocess
    import sys
    import zipfile

    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "-w", str(wheels), str(REPO)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (wheel,) = wheels.glob("dermscore-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        assert "dermscore/template.yaml" in z.namelist()
        z.extractall(site)
    assert (site / "dermscore" / "template.yaml").read_text() == (REPO / "template.yaml").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for argv in (["plan", "--images-per-day", "1000000"], ["query", "--list"]):
        code = ("import sys, dermscore; from dermscore.cli import main; "
                f"assert dermscore.__file__.startswith({str(site)!r}), dermscore.__file__; sys.exit(main({argv!r}))")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere,
                             env={**os.environ, "PYTHONPATH": str(site)})
        assert run.returncode == 0, run.stderr
        assert "Traceback" not in run.stderr
    assert "high-melanoma-risk-triage" in run.stdout
