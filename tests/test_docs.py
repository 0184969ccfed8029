"""The docs state facts that live in code: these tests keep them equal.

docs/results.md lists the failure reasons and stages (``dermscore.reasons``); docs/deploy.md counts
the template's alarms and names its functions; the README's commands are commands; no user-facing
text names an issue number (users cannot open the project's issues).
"""

from __future__ import annotations

import re
from pathlib import Path

from dermscore import reasons
from dermscore.cli import COMMANDS
from dermscore.template import load_template

REPO = Path(__file__).resolve().parents[1]
NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "twelve": 12, "thirteen": 13, "fourteen": 14,
           "fifteen": 15, "sixteen": 16, "seventeen": 17}


def table_row(doc: str, column: str) -> list[str]:
    """The backticked words of the meaning cell of ``| `column` | type | meaning |``."""
    (row,) = [ln for ln in doc.splitlines() if ln.startswith(f"| `{column}` |")]
    return re.findall(r"`([a-z_]+)`", row.split("|")[3])


def test_results_doc_lists_every_reason_and_stage():
    doc = (REPO / "docs" / "results.md").read_text()
    assert sorted(table_row(doc, "reason")) == sorted(reasons.CODES)
    assert set(table_row(doc, "stage")) == set(reasons.STAGES)


def test_every_failure_row_is_written_with_a_known_stage():
    """The stages are constants of dermscore.reasons, and only those reach failure_row."""
    for path in (REPO / "handlers").glob("*.py"):
        for m in re.finditer(r"failure_row\([^,]+,\s*([^,]+),", path.read_text()):
            stage = m.group(1).strip()
            assert stage.startswith("reasons.") and getattr(reasons, stage.split(".", 1)[1]) in reasons.STAGES, \
                (path.name, stage)


def test_deploy_doc_counts_the_alarms_and_names_the_functions():
    template = load_template()
    alarms = [k for k, r in template["Resources"].items() if r["Type"] == "AWS::CloudWatch::Alarm"]
    functions = sorted(r["Properties"]["FunctionName"]["Fn::Sub"].split("-", 1)[1]
                       for r in template["Resources"].values() if r["Type"] == "AWS::Serverless::Function")
    doc = (REPO / "docs" / "deploy.md").read_text()
    counted = {NUMBERS[w.lower()] for w in re.findall(r"\b(\w+) (?:CloudWatch )?alarms\b", doc) if w.lower() in NUMBERS}
    assert counted == {len(alarms)}, (counted, len(alarms))
    (named,) = re.findall(r"(\w+) Lambda functions, each with its own role and log group: ([^.]+)\.", doc)
    assert NUMBERS[named[0].lower()] == len(functions)
    assert sorted(re.findall(r"`([a-z]+)`", named[1])) == functions
    assert "per suffix" not in doc and "up to 5 minutes" not in doc


def test_readme_commands_are_commands():
    readme = (REPO / "README.md").read_text()
    used = set(re.findall(r"`dermscore ([a-z-]+)", readme)) | set(re.findall(r"bin/dermscore ([a-z-]+)", readme))
    assert used and used <= set(COMMANDS), used - set(COMMANDS)
    listed = set(re.findall(r"^\| `dermscore ([a-z-]+)", readme, re.M))
    assert listed == set(COMMANDS), set(COMMANDS) ^ listed


def test_no_user_facing_text_names_an_issue():
    pattern = re.compile(r"\bissues? #?\d+", re.I)
    texts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "models" / "default" / "MODEL_CARD.md"]
    for path in texts:
        assert not pattern.search(path.read_text()), f"{path.relative_to(REPO)}: {pattern.search(path.read_text())}"
    for name, (_module, help_text) in COMMANDS.items():
        assert not pattern.search(help_text), name
