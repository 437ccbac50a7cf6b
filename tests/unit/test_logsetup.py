"""Log lines under journald (JOURNAL_STREAM names stderr): ``<N>`` syslog priority
prefix, no timestamp; anywhere else: today's timestamped format."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TextIO

import pytest

from vmem_guest.logsetup import (
    JOURNAL_STREAM,
    JournalFormatter,
    is_journal_stream,
    make_handler,
    syslog_priority,
)


def stream_id(stream: TextIO) -> str:
    info = os.fstat(stream.fileno())
    return f"{info.st_dev}:{info.st_ino}"


def emit(handler: logging.Handler, level: int, message: str) -> None:
    logger = logging.getLogger(f"vmem_guest.test.{id(handler)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        logger.log(level, message)
    finally:
        logger.removeHandler(handler)


def test_journal_stream_is_recognized_by_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        assert is_journal_stream(a, {JOURNAL_STREAM: stream_id(a)})
        assert not is_journal_stream(b, {JOURNAL_STREAM: stream_id(a)})  # inherited, redirected
        assert not is_journal_stream(a, {})
        assert not is_journal_stream(a, {JOURNAL_STREAM: "garbage"})
        assert not is_journal_stream(a, {JOURNAL_STREAM: ":"})
    assert not is_journal_stream(io.StringIO(), {JOURNAL_STREAM: "1:2"})  # no fd at all


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
        (logging.DEBUG, 7),
        (logging.INFO + 5, 6),
        (1, 7),
    ],
)
def test_priorities_are_sd_daemons(level: int, priority: int) -> None:
    assert syslog_priority(level) == priority


def test_under_journald_each_line_has_a_priority_and_no_timestamp(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "w+") as out:
        handler = make_handler(out, {JOURNAL_STREAM: stream_id(out)})
        assert isinstance(handler.formatter, JournalFormatter)
        emit(handler, logging.ERROR, "device broken, not touching it any more: x")
        emit(handler, logging.WARNING, "subblock unplug off")
        emit(handler, logging.INFO, "resize done")
        emit(handler, logging.DEBUG, "two\nlines")
        out.seek(0)
        name = f"vmem_guest.test.{id(handler)}"
        assert out.read().splitlines() == [
            f"<3>{name}: device broken, not touching it any more: x",
            f"<4>{name}: subblock unplug off",
            f"<6>{name}: resize done",
            f"<7>{name}: two",
            "<7>lines",
        ]


def test_elsewhere_lines_keep_their_timestamp(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "w+") as out:
        handler = make_handler(out, {JOURNAL_STREAM: "1:1"})
        emit(handler, logging.WARNING, "subblock unplug off")
        out.seek(0)
        line = out.read()
    pattern = (
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING vmem_guest\.test\.\d+: subblock unplug off\n"
    )
    assert re.fullmatch(pattern, line)


def test_the_cli_logs_for_the_journal_when_stderr_is_the_journal(tmp_path: Path) -> None:
    """The command's own logging set-up, in a process whose stderr is a file whose
    device and inode JOURNAL_STREAM names (as systemd sets it for a service)."""
    script = (
        "import logging\n"
        "from vmem_guest.cli import _setup_logging\n"
        "_setup_logging('info')\n"
        "logging.getLogger('vmem_guest.driver.x').error('device broken, not touching it: y')\n"
        "logging.getLogger('vmem_guest.agent').debug('not shown at info')\n"
    )
    path = tmp_path / "stderr"
    for journal in (True, False):
        with open(path, "w") as err:
            env = dict(os.environ)
            env[JOURNAL_STREAM] = stream_id(err) if journal else "0:0"
            subprocess.run([sys.executable, "-c", script], stderr=err, env=env, check=True)
        text = path.read_text()
        if journal:
            assert text == "<3>vmem_guest.driver.x: device broken, not touching it: y\n"
        else:
            assert re.fullmatch(r"\S+ \S+ ERROR vmem_guest\.driver\.x: device broken.*\n", text)
