"""Guest side: run several ``vmem-guest`` command lines in one process.

``python cli_batch.py '["plug 3M", "unplug 1G"]'`` calls the CLI's entry point
(``vmem_guest.cli.main``) once per command line, with stdout and stderr captured apart,
and prints one JSON list of ``[exit status, stdout, stderr]``. What each command does
and prints is the CLI's own; what is saved is a Python start-up and the CLI's imports
per command, 5-10 s each in a TCG guest on a busy host (docs/startup.md). Tests that
are about the process itself (exit status of the real program, a non-root user) start
``vmem-guest`` instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import sys


def run_one(command_line: str) -> list[object]:
    """[exit status, stdout, stderr] of ``vmem-guest COMMAND_LINE``, run in-process."""
    from vmem_guest import cli

    out, err = io.StringIO(), io.StringIO()
    code: object = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(shlex.split(command_line))
        except SystemExit as exc:
            code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, status 1
        err.write(f"{code}\n")
        code = 1
    return [code, out.getvalue(), err.getvalue()]


def main() -> None:
    command_lines = json.loads(sys.argv[1])
    print(json.dumps([run_one(str(line)) for line in command_lines]))


if __name__ == "__main__":
    main()
