"""Where log lines go and how they look: journald's priorities, or a timestamped stderr.

Under systemd, a service's stderr is a stream to journald, which reads a leading
``<N>`` on each line as the syslog priority of that line (sd-daemon(3): SD_ERR is
``<3>``, SD_WARNING ``<4>``, SD_INFO ``<6>``, SD_DEBUG ``<7>``) and timestamps the
line itself. So under journald each line is ``<N>logger: message`` and
``journalctl -p warning -u vmem-guest`` shows the warnings and errors; elsewhere
(a terminal, a file, the test VM's console) lines keep their own timestamp and
level name.

Whether stderr *is* journald's stream: systemd sets ``$JOURNAL_STREAM`` to the
stream's ``device:inode`` (decimal), and a process checks it against ``fstat`` of
its stderr, since a stderr redirected by a child's caller no longer goes to the
journal although the variable was inherited (systemd.exec(5), "Environment
variables in spawned processes": JOURNAL_STREAM).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

#: The variable systemd sets when stdout or stderr is connected to the journal.
JOURNAL_STREAM = "JOURNAL_STREAM"

#: Format of a line not going to the journal.
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: syslog priorities (sd-daemon.h SD_CRIT .. SD_DEBUG) of Python's levels.
PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
    (logging.DEBUG, 7),
)


def syslog_priority(levelno: int) -> int:
    """The priority of a record's level: that of the nearest standard level at or below."""
    for level, priority in PRIORITIES:
        if levelno >= level:
            return priority
    return 7


def is_journal_stream(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """``stream`` is the journal stream ``$JOURNAL_STREAM`` names (same st_dev and st_ino)."""
    value = (os.environ if environ is None else environ).get(JOURNAL_STREAM, "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):  # ValueError: a stream without a file descriptor
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``, every line of it prefixed (journald splits the stream
    at newlines, so a traceback's lines keep the record's priority)."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def make_handler(stream: TextIO, environ: Mapping[str, str] | None = None) -> logging.Handler:
    """A handler writing to ``stream``, in the journal's form when it is the journal
    stream (``environ``: ``os.environ`` by default)."""
    handler = logging.StreamHandler(stream)
    if is_journal_stream(stream, environ):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    return handler


def setup_logging(level: str) -> None:
    """Log records at ``level`` ("debug" .. "error") and above to stderr, as
    :func:`logging.basicConfig` does (nothing when the root logger has handlers)."""
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[make_handler(sys.stderr)])
