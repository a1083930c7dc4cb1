"""The `qwen35` command as a person meets it: version, help, and one-line errors."""

import subprocess
import sys

import pytest

from qwen35 import __version__
from qwen35.cli import SUBCOMMANDS


def qwen35(*args):
    return subprocess.run(
        [sys.executable, "-m", "qwen35", *args], capture_output=True, text=True, timeout=120
    )


def test_version_matches_the_installed_distribution():
    from importlib.metadata import version

    result = qwen35("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"qwen35 {version('qwen35')}"
    assert __version__ == version("qwen35")


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(command):
    result = qwen35(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: qwen35 " + command in result.stdout


def test_unknown_subcommand_is_one_line_and_nonzero():
    result = qwen35("frobnicate")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "invalid choice" in result.stderr


def test_the_command_line_parser_imports_no_torch():
    """`qwen35 --help`, `list` and `show` answer at once: only the commands that run a model import torch."""
    script = "import sys; from qwen35.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
