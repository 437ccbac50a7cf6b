"""docs/man/vmem-guest.1: written from the click commands, committed, kept current."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import click
import pytest

from vmem_guest import __version__, cli, manpage

COMMITTED = Path(__file__).resolve().parents[2] / "docs/man/vmem-guest.1"


def test_the_committed_page_is_current() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == manpage.render(), (
        "docs/man/vmem-guest.1 is stale: run `make man` and commit it"
    )


def test_every_command_option_and_argument_is_on_the_page() -> None:
    page = manpage.render()
    assert f'"vmem-guest {__version__}"' in page
    for name, command in cli.cli.commands.items():
        assert f".SS \\fBvmem\\-guest {manpage.literal(name)}\\fR" in page, name
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in (*param.opts, *param.secondary_opts):
                    assert f"\\fB{manpage.literal(opt)}\\fR" in page, (name, opt)
            else:
                assert f"\\fI{(param.name or '').upper()}\\fR" in page, (name, param.name)


def test_text_that_roff_would_read_as_requests_is_escaped() -> None:
    assert manpage.escape(".so /etc/passwd\n'br\nC:\\x") == "\\&.so /etc/passwd\n\\&'br\nC:\\ex"
    assert manpage.literal("--no-subblock-unplug") == "\\-\\-no\\-subblock\\-unplug"
    assert manpage.paragraphs("One\n    two.\n\n    Three.\n") == ["One two.", "Three."]


@pytest.mark.skipif(shutil.which("man") is None, reason="no man(1)")
def test_man_renders_the_page_without_warnings() -> None:
    proc = subprocess.run(
        ["man", "--warnings", "-l", str(COMMITTED)],
        env={**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80", "MAN_KEEP_FORMATTING": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.startswith("VMEM-GUEST(1)")
    text = " ".join(proc.stdout.split())  # man fills lines to MANWIDTH
    assert "vmem-guest - a userspace guest driver for virtio-mem devices" in text
    assert "--subblock-unplug / --no-subblock-unplug" in text
    assert "[default: /run/vmem-guest]" in text
