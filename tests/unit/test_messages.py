"""The library speaks in settings and actions, the CLI in flags and command lines (``errors.py``, ``cli/messages.py``).

A message outside ``fewshot_sla/cli/`` names a setting with ``setting(name)`` and an action with ``command(...)``;
``test_no_message_outside_the_cli_names_a_flag_or_a_command_line`` greps the package for the rest. A Python user of
``fewshot_sla.api`` reads field names and API calls, a shell user of ``fewshot-sla`` the flags and commands of today.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fewshot_sla import api
from fewshot_sla.cli import main
from fewshot_sla.cli.messages import CliVoice, flag
from fewshot_sla.config import RunConfig, knobs
from fewshot_sla.errors import UserError, command, render, setting, voice
from tests.helpers.paths import REPO

PACKAGE = REPO / "fewshot_sla"
FLAG = re.compile(r"(?<![\w-])--[a-z]")
COMMAND_LINE = re.compile(r"fewshot-sla (run|eval|data|episodes|leaderboard|list|compare|predict|--)\b(?! folder)")
ARGV_WORD = re.compile(r"--[a-z][a-z0-9-]*")  # one flag alone: a word of an argument list, not a message
# Text that documents the command line itself, not a message: (module, enclosing function or call) -> why.
ALLOWED = {
    ("config/run_config.py", "Knob"): "the help of each run flag, rendered by cli/run.py and docs/configuration.md",
    ("config/run_config.py", "configuration_reference"): "docs/configuration.md, the reference of the flags",
    ("config/run_config.py", "__missing__"): "docs/configuration.md's pointer to 'fewshot-sla list'",
    ("leaderboard/build.py", "_other_sections"): "leaderboard.md, a report on what the CLI did",
    ("leaderboard/build.py", "render_markdown"): "leaderboard.md, a report on what the CLI did",
    ("leaderboard/build.py", "_unpaired_row"): "a row note of leaderboard.md and its CSV, files of the report",
}


def _offenders(path: Path) -> list[str]:
    """``file:line`` of each string constant of a module that names a flag or builds a command line, except
    docstrings, single argument words, torchrun's command lines and the ALLOWED documentation."""
    rel = str(path.relative_to(PACKAGE))
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    found = []

    def visit(node: ast.AST, where: tuple[str, ...]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            where = (*where, node.name)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            where = (*where, node.func.id)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            named = FLAG.search(text) or COMMAND_LINE.search(text)
            exempt = ARGV_WORD.fullmatch(text) or "torchrun" in text or any((rel, w) in ALLOWED for w in where)
            if named and not exempt:
                found.append(f"fewshot_sla/{rel}:{node.lineno}: {text.strip()[:80]!r}")
        for child in ast.iter_child_nodes(node):
            visit(child, where)

    visit(tree, ())
    return found


def test_no_message_outside_the_cli_names_a_flag_or_a_command_line() -> None:
    offenders = [
        line
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).parts[0] != "cli"
        for line in _offenders(path)
    ]
    assert offenders == [], (
        "name settings with errors.setting(...) and actions with errors.command(...):\n" + "\n".join(offenders)
    )


def test_the_scan_finds_a_flag_and_a_command_line(tmp_path: Path) -> None:
    module = PACKAGE / "_scan_probe.py"
    module.write_text(
        '"""Docstrings may say --train-ways and fewshot-sla run."""\n'
        'A = "use --train-ways 5 or fewer"\nB = f"run \'fewshot-sla eval {A}\'"\nC = ["--out"]\n'
    )
    try:
        assert [line.split(":")[1] for line in _offenders(module)] == ["2", "3"]
    finally:
        module.unlink()


def test_settings_read_as_fields_in_the_library_and_as_flags_in_the_cli() -> None:
    message = (
        f"use {setting('train_ways')} 5 or fewer, or {setting('backbone_options')}; choose another {setting('out')}"
    )
    assert str(UserError(message)) == "use train_ways 5 or fewer, or backbone_options; choose another out"
    assert render(message, CliVoice()) == "use --train-ways 5 or fewer, or --backbone-option; choose another --out"
    with voice(CliVoice()):
        assert str(UserError(message)) == render(message, CliVoice())
    for name, knob in knobs().items():  # every run flag comes from its field's Knob
        if knob.flag:
            assert flag(name) == knob.flag


def test_actions_read_as_api_calls_in_the_library_and_as_command_lines_in_the_cli() -> None:
    cases = {
        command("run", resume=True, out="runs/a"): (
            'fewshot_sla.api.resume("runs/a")',
            "fewshot-sla run --resume --out runs/a",
        ),
        command("eval", "runs/a", dataset="cub", episodes_file="s.npz"): (
            'fewshot_sla.api.evaluate("runs/a", dataset="cub", episodes_file="s.npz")',
            "fewshot-sla eval runs/a --dataset cub --episodes-file s.npz",
        ),
        command("eval", "runs/a", dataset=None): ('fewshot_sla.api.evaluate("runs/a")', "fewshot-sla eval runs/a"),
        command("data prepare", "cub", source="<PATH>", force=True): (
            'fewshot_sla.api.prepare_dataset("cub", source="<PATH>", force=True)',
            "fewshot-sla data prepare cub --source <PATH> --force",
        ),
        command("data prepare", "mine", data_root="/d", source="DIR", layout="imagefolder"): (
            'fewshot_sla.api.prepare_image_folder("mine", source="DIR")',
            "fewshot-sla --data-root /d data prepare mine --source DIR --layout imagefolder",
        ),
        command("episodes make", dataset="cub", count=5): (
            'the episodes make action with dataset="cub", count=5',
            "fewshot-sla episodes make --dataset cub --count 5",
        ),
        command("run"): ("fewshot_sla.api.train", "fewshot-sla run"),
        command("eval"): ("fewshot_sla.api.evaluate", "fewshot-sla eval"),
    }
    for marker, (library, cli) in cases.items():
        assert (render(marker), render(marker, CliVoice())) == (library, cli)


def test_a_library_error_names_fields_through_the_api_and_flags_through_the_cli(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = RunConfig(dataset="synthetic", device="cpu", train_ways=1000, train_episodes=2)
    with pytest.raises(UserError) as caught:
        api.train(config, out=tmp_path / "api", data_root=data_root)
    assert "use train_ways" in str(caught.value) and "--" not in str(caught.value)
    code = main(
        [
            "--data-root",
            str(data_root),
            "run",
            "--device",
            "cpu",
            "--train-ways",
            "1000",
            "--out",
            str(tmp_path / "cli"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "use --train-ways" in err and "\x00" not in err
    with pytest.raises(UserError) as caught:
        api.evaluate(tmp_path / "nothing", data_root=data_root)
    assert "fewshot-sla" not in str(caught.value)
