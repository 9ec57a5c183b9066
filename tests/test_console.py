"""Output that survives pipes and logs: whole names in tables, plain progress lines."""

import io
import re
import subprocess
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from pyro_cvae.cli import app
from pyro_cvae.console import Column, Progress, print_table
from pyro_cvae.data import FILES
from pyro_cvae.model import VARIANTS

NARROW = {
    "COLUMNS": "60",
    "TERM": "dumb",
}  # a pipe at 60 columns: not a terminal, narrower than any table


def _first_words(output: str) -> set[str]:
    return {line.split()[0] for line in output.splitlines() if line.strip()}


def test_variants_through_a_narrow_pipe_keep_every_name_and_config_whole():
    result = CliRunner(env=NARROW).invoke(app, ["variants"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert set(VARIANTS) <= _first_words(result.output), (
        "a row per variant, its name whole at the start"
    )
    for v in VARIANTS.values():
        row = next(line for line in result.output.splitlines() if line.split()[0] == v.name)
        assert v.summary in row and (v.reference_config or "(paper)") in row.split()


def test_data_through_a_narrow_pipe_keeps_every_file_name_and_path_whole(tmp_path, mnist_dir):
    deep = (
        tmp_path / ("a-folder-with-a-long-name-" * 3) / "mnist"
    )  # paths far wider than 60 columns
    deep.mkdir(parents=True)
    for path in mnist_dir.iterdir():
        (deep / path.name).symlink_to(path.resolve())
    result = CliRunner(env=NARROW).invoke(app, ["data", "--data-dir", str(deep)])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and f"MNIST in {deep}" in result.output.splitlines()
    for stem in FILES:
        row = next(line for line in result.output.splitlines() if line.startswith(stem + " "))
        assert any(word.startswith(str(deep / stem)) for word in row.split()), row


@pytest.mark.parametrize("width,boxed", [(200, True), (40, False)])
def test_a_terminal_table_is_drawn_only_when_the_names_fit(width, boxed):
    out = Console(file=io.StringIO(), force_terminal=True, width=width, color_system=None)
    rows = [
        ["cond-decoder-no-baseline", "a long description " * 4, "/a/path/that/is/long/enough.json"]
    ]
    print_table(
        "title",
        [Column("variant", whole=True), Column("what"), Column("path", whole=True)],
        rows,
        out=out,
    )
    text = out.file.getvalue()
    assert ("┃" in text) == boxed
    assert "cond-decoder-no-baseline" in text and "/a/path/that/is/long/enough.json" in text


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_progress_prints_at_milestones_and_at_least_every_minute():
    clock, out = FakeClock(), Console(file=io.StringIO(), width=60)
    with Progress("run", total=1000, completed=100, out=out, clock=clock) as progress:
        for step in range(101, 1001):
            clock.now += 0.5  # 2 steps per second
            progress.update(step, f"epoch {step // 500 + 1}/2", milestone=step == 500)
    lines = out.file.getvalue().splitlines()
    # a line at 60 s, 120 s, ... (every 120 steps), and one at step 500 (the milestone)
    assert [int(re.match(r"run: (\d+)/1000 steps", line).group(1)) for line in lines] == [
        220,
        340,
        460,
        500,
        620,
        740,
        860,
        980,
    ]
    assert lines[0] == "run: 220/1000 steps (22%), epoch 1/2, 2.0 steps/s, ETA 0:06:30"


def test_disabled_progress_prints_nothing():
    out = Console(file=io.StringIO())
    with Progress("run", total=10, enabled=False, out=out, every_s=0) as progress:
        progress.update(5, milestone=True)
    assert out.file.getvalue() == ""


def test_training_into_a_file_writes_progress_lines(tmp_path, mnist_dir):
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pyro_cvae",
                "train",
                "--variant",
                "no-baseline",
                "--epochs",
                "2",
                "--limit",
                "64",
                "--batch-size",
                "16",
                "--threads",
                "1",
                "--runs-dir",
                str(tmp_path / "runs"),
                "--data-dir",
                str(mnist_dir),
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=True,
        )
    text = log.read_text()
    progress = [line for line in text.splitlines() if line.startswith("no-baseline: ")]
    pattern = (
        r"no-baseline: (\d)/8 steps \(\d+%\), epoch (\d)/2 done, loss [\d.]+ recon [\d.]+ kl [\d.]+, "
        r"[\d.]+ steps/s, ETA \d+:\d\d:\d\d"
    )
    assert [re.fullmatch(pattern, line).groups() for line in progress] == [
        ("4", "1"),
        ("8", "2"),
    ], text
    assert "━" not in text and "\x1b" not in text, "no bar, no escape codes in a file"
