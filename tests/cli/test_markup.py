"""Text from outside is printed as it is, never read as rich markup (issue 24 §7).

A folder named ``run[red]x[/]`` must appear with its brackets in errors, hints, notes and tables:
rich would otherwise eat ``[red]`` as a style and refuse ``[/]`` ("closing tag has nothing to
close") or, with an opening tag in the name, restyle the rest of the line.
"""

from __future__ import annotations

import io

from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner

from helpers import make_run
from merger.cli import app, ui

runner = CliRunner()
NAME = "run[red]x[/]"


def test_error_and_hint_print_a_path_literally(tmp_path):
    root, _ = make_run(tmp_path / NAME, steps=(1000, 2000))
    out = tmp_path / "out[bold red]y[/]"  # exists and is not merger's: refused, the path in message and hint
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    r = runner.invoke(app, ["average", str(root), "-o", str(out), "--force"])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "unexpected" not in r.output, r.output
    err = r.stderr
    assert err.startswith(f"Error: output folder {out} exists and is not a merger output"), err
    assert f"hint: choose another --output, or move {out} away yourself" in err, err
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_input_path_with_brackets(tmp_path):
    missing = tmp_path / "nothing[/]" / "[red]here"
    r = runner.invoke(app, ["average", str(missing), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "Traceback" not in r.output and "unexpected" not in r.output, r.output
    assert r.stderr.startswith("Error: ") and str(missing) in r.stderr, r.stderr


def test_success_summary_prints_the_output_literally(tmp_path):
    root, _ = make_run(tmp_path / NAME, steps=(1000, 2000))
    out = tmp_path / "merged[bold]z[/]"
    r = runner.invoke(app, ["average", str(root), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert f"merged 2 checkpoints -> {out}" in r.stdout, r.stdout


def test_info_lines_and_tables_are_plain_text(capsys):
    ui.info(f"resolving {NAME}")
    assert capsys.readouterr().err == f"resolving {NAME}\n"
    buf = io.StringIO()
    console = Console(file=buf, width=200, color_system=None)
    console.print(ui.table(f"{NAME}: bits_per_byte", [("step", "right"), (f"rev {NAME}", "left")],
                           [["5", f"step5{NAME}"], ["10", Text("styled", style="bold")]]))
    text = buf.getvalue()
    assert f"{NAME}: bits_per_byte" in text and f"rev {NAME}" in text and f"step5{NAME}" in text, text
