"""Shell completion as docs/install.md tells a user to set it up, in a real bash.

click writes the script (``_VMEM_GUEST_COMPLETE=bash_source vmem-guest``) and answers
the script's questions; the variable's name comes from the program name that
``cli.main`` gives click, so the test runs the entry point under that name. ``make
test-debian-packages`` runs this file with Debian 12's click 8.1.3, ``make test``
with the newest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")


@pytest.fixture(scope="module")
def path_with_vmem_guest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PATH whose ``vmem-guest`` is this checkout's entry point under this Python."""
    bin_dir = tmp_path_factory.mktemp("bin")
    script = bin_dir / "vmem-guest"
    script.write_text(
        f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m vmem_guest.cli "$@"\n'
    )
    script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def shell(path: str, *argv: str) -> str:
    """Run a shell command line with ``path``; its stdout (stderr goes to the failure)."""
    proc = subprocess.run(
        argv,
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def complete(path: str, *words: str) -> list[str]:
    """What bash offers after ``words`` (the last one being typed), set up with the
    line docs/install.md gives for ~/.bashrc."""
    program = f"""
        eval "$(_VMEM_GUEST_COMPLETE=bash_source vmem-guest)"
        complete -p vmem-guest
        COMP_WORDS=({" ".join(f"'{w}'" for w in words)})
        COMP_CWORD={len(words) - 1}
        _vmem_guest_completion vmem-guest
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    # complete -p prints the registration to stdout, ahead of the offers.
    registration, *offered = shell(path, "bash", "--norc", "--noprofile", "-c", program).split("\n")
    assert registration.endswith("-F _vmem_guest_completion vmem-guest")
    return " ".join(offered).split()


@needs_bash
def test_commands_complete(path_with_vmem_guest: str) -> None:
    assert complete(path_with_vmem_guest, "vmem-guest", "s") == ["sim", "state", "status"]
    assert complete(path_with_vmem_guest, "vmem-guest", "unp") == ["unplug", "unplug-all"]


@needs_bash
def test_options_complete(path_with_vmem_guest: str) -> None:
    assert complete(path_with_vmem_guest, "vmem-guest", "sim", "--re") == [
        "--region",
        "--resize",
    ]


@needs_bash
def test_choices_complete(path_with_vmem_guest: str) -> None:
    offered = complete(path_with_vmem_guest, "vmem-guest", "run", "--log-level", "")
    assert offered == ["debug", "info", "warning", "error"]


@pytest.mark.skipif(shutil.which("fish") is None, reason="no fish")
def test_fish_completes_with_the_documented_setup(path_with_vmem_guest: str) -> None:
    program = (
        "_VMEM_GUEST_COMPLETE=fish_source vmem-guest | source;"
        " complete -C 'vmem-guest s'; complete -C 'vmem-guest run --log-level '"
    )
    lines = shell(path_with_vmem_guest, "fish", "--no-config", "-c", program).splitlines()
    assert [line.split("\t")[0] for line in lines] == [
        *("sim", "state", "status"),
        *("debug", "error", "info", "warning"),  # fish sorts them
    ]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="no zsh")
def test_zsh_registers_the_documented_setup(path_with_vmem_guest: str, tmp_path: Path) -> None:
    program = (
        f"autoload -Uz compinit && compinit -u -d {tmp_path}/zcompdump;"
        ' eval "$(_VMEM_GUEST_COMPLETE=zsh_source vmem-guest)";'
        ' print -- "${_comps[vmem-guest]}"'
    )
    assert shell(path_with_vmem_guest, "zsh", "-f", "-c", program) == "_vmem_guest_completion\n"
