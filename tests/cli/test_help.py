"""The CLI's face: grouped help that fits 80 columns, choices refused at parse time, one examples
block per command laid out the same way, and one error path for every command."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from helpers import make_run
from merger.cli import app, options
from merger.errors import MergerError

runner = CliRunner()
COMMANDS = ("average", "eval", "sweep", "grow")
PANELS = ("Selection", "Method", "Output", "Resources", "Resume and safety", "Evaluation")
SCREEN = 24  # lines of a terminal


def help_text(command: str, columns: int = 80) -> str:
    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": str(columns), "TERM": "dumb"})
    assert r.exit_code == 0, r.output
    return r.stdout


def panels(text: str) -> dict[str, list[str]]:
    """Panel title -> its lines (box included)."""
    out, title = {}, None
    for line in text.splitlines():
        m = re.match(r"╭─ (.+?) ─", line)
        if m:
            title = m.group(1)
            out[title] = []
        if title is not None:
            out[title].append(line)
        if line.startswith("╰"):
            title = None
    return out


def test_average_help_is_grouped_and_fits_80_columns():
    text = help_text("average")
    got = panels(text)
    assert [p for p in got if p in PANELS] == list(PANELS)
    assert all(len(line) <= 80 for line in text.splitlines()), max(text.splitlines(), key=len)
    for title, lines in got.items():
        assert len(lines) <= SCREEN, (title, len(lines))
    where = {flag: title for title, lines in got.items() for line in lines
             for flag in re.findall(r"(--[a-z-]+)", line[:24])}
    assert where["--revisions"] == "Selection" and where["--method"] == "Method"
    assert where["--output"] == "Output" and where["--max-memory"] == "Resources"
    assert where["--resume"] == "Resume and safety" and where["--eval"] == "Evaluation"
    assert "uniform | ema | linear | weights | decay" in text and "linear | cosine | 1-sqrt" in text
    assert "hf | safetensors | nanogpt | dcp" in text and "auto | float32 | float64" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_ends_with_one_examples_block(command):
    text = help_text(command)
    assert all(len(line) <= 80 for line in text.splitlines())
    head, _, block = text.rpartition(" Examples")
    assert "Examples" not in head  # one block, after the panels
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    assert lines and all(line.startswith(("$ ", "# ")) for line in lines), lines
    assert any(line.startswith(f"$ merger {command} ") for line in lines)
    assert lines[-1].startswith("$ ")  # a comment is about the example after it


def test_docstring_paragraphs_flow_to_the_terminal_width():
    """typer's rich help keeps a docstring's line breaks; the commands' help is unwrapped first, so a
    paragraph fills each line at 120 columns as at 80."""
    for columns in (80, 120):
        text = help_text("sweep", columns)
        para = [line for line in text.splitlines() if line.startswith(" Each checkpoint is read")]
        assert para and len(para[0].rstrip()) > columns - 15, para


def test_choice_tables_are_the_librarys():
    from merger.eval.sweep import SERIES
    from merger.grow.run import INITS
    from merger.output.convert import OUTPUTS
    from merger.plan.decay import SHAPES
    from merger.plan.methods import METHODS

    assert [c.value for c in options.MethodChoice] == list(METHODS)
    assert [c.value for c in options.ShapeChoice] == list(SHAPES)
    assert {c.value for c in options.OutputChoice} == set(OUTPUTS) - {"gpt2"}
    assert [c.value for c in options.InitChoice] == list(INITS)
    assert set(options.SWEEP_METHODS) == set(SERIES) - {"raw"}


@pytest.mark.parametrize("args, says", [
    (["average", "RUN", "--method", "lawa"], "'lawa' is not one of"),
    (["average", "RUN", "--method", "decay", "--shape", "exp"], "'exp' is not one of"),
    (["average", "RUN", "--to", "gguf"], "'gguf' is not one of"),
    (["average", "RUN", "--accumulate", "float16"], "'float16' is not one of"),
    (["average", "RUN", "--device", "tpu"], "'tpu' is not a device"),
    (["eval", "RUN", "--device", "cuda:x"], "'cuda:x' is not a device"),
    (["sweep", "RUN", "-k", "2", "--methods", "uniform,swa"], "'swa': use a comma-separated list of"),
    (["sweep", "RUN", "-k", "2", "--shape", "exp"], "'exp' is not one of"),
    (["grow", "RUN", "-o", "OUT", "--init", "xavier"], "'xavier' is not one of"),
])
def test_choices_are_refused_at_parse_time(tmp_path, args, says):
    root, _ = make_run(tmp_path / "run")
    out = tmp_path / "out"
    args = [str(root) if a == "RUN" else str(out) if a == "OUT" else a for a in args]
    r = runner.invoke(app, [*args, "-o" if args[0] != "grow" and args[0] != "eval" else "--json", str(out)]
                      if args[0] != "grow" else args, env={"COLUMNS": "200"})
    assert r.exit_code == 2, r.output  # click's usage error: nothing ran
    assert says in " ".join(r.stderr.split()), r.stderr
    assert "Traceback" not in r.output and not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("choice", [["--method", "EMA", "--decay", "0.5"], ["--accumulate", "Float64"]])
def test_choices_take_any_case_and_reach_the_library_as_strings(tmp_path, choice):
    import json

    root, _ = make_run(tmp_path / "run")
    r = runner.invoke(app, ["average", str(root), *choice, "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert "ema" in json.dumps(plan["method"]) if "--method" in choice else plan["accumulate"] == "float64"


def _bad_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    return str(empty)


@pytest.mark.parametrize("argv", [
    ["average", "EMPTY", "-o", "OUT"],
    ["eval", "EMPTY", "--limit", "1"],
    ["sweep", "EMPTY", "-k", "2", "-o", "OUT"],
    ["grow", "EMPTY", "-o", "OUT"],
])
def test_one_error_path_for_every_command(tmp_path, argv):
    argv = [_bad_folder(tmp_path) if a == "EMPTY" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    r = runner.invoke(app, argv)
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]  # after any progress lines
    assert len(errors) == 1 and "\nhint: " in r.stderr and "Traceback" not in r.output
    assert r.stdout == ""
    dbg = runner.invoke(app, [*argv, "--debug"])  # the exception itself reaches the caller
    assert dbg.exit_code == 1 and isinstance(dbg.exception, MergerError), dbg.output


def test_ctrl_c_is_clean_in_every_command(tmp_path, monkeypatch):
    """Ctrl-C during the work (the library call, stood in for by one that raises KeyboardInterrupt):
    one line, exit 130, no traceback."""
    import merger.eval.harness

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merger.eval.harness, "evaluate", interrupted)
    r = runner.invoke(app, ["eval", str(tmp_path)])
    assert r.exit_code == 130 and "Interrupted" in r.stderr and "Traceback" not in r.output


def test_an_unexpected_exception_is_named_without_a_traceback(tmp_path, monkeypatch):
    import merger.eval.harness

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(merger.eval.harness, "evaluate", broken)
    r = runner.invoke(app, ["eval", str(tmp_path)])
    assert r.exit_code == 1 and "Error: unexpected ZeroDivisionError: a bug" in r.stderr
    assert "--debug" in r.stderr and "Traceback" not in r.output
