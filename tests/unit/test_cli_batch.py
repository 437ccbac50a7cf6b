"""The harness's batch of CLI command lines in one guest process (cli_batch.py) gives
what a process per command line gives: exit status, stdout and stderr apart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1].parent
CLI_BATCH = ROOT / "scripts" / "vmharness" / "cli_batch.py"


def test_a_batch_prints_what_separate_processes_print(tmp_path: Path) -> None:
    command_lines = [
        "plug -1",
        "plug -- -1",
        f"status --json --state-dir {tmp_path}",
        "plug --addr 0x10000000000000000 --blocks 1",
        "--version",
    ]
    batch = subprocess.run(
        [sys.executable, str(CLI_BATCH), json.dumps(command_lines)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    results = json.loads(batch.stdout)
    for command_line, (code, out, err) in zip(command_lines, results, strict=True):
        alone = subprocess.run(
            [sys.executable, "-m", "vmem_guest.cli", *command_line.split()],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        assert (code, out, err) == (alone.returncode, alone.stdout, alone.stderr), command_line
    assert [code for code, _, _ in results] == [2, 2, 0, 2, 0]
