"""Host resizes from a guest: :class:`HostResizeFiles`, a file rendezvous with a harness.

A guest cannot set its device's ``requested-size``; the host can (QMP
``qom-set``). This is the guest's half of asking it to, through a directory
both see. The host's half is ``HostResizer`` in ``scripts/conformance.py``;
nothing here talks to QMP.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from vmem_guest.errors import UsageError

#: How long a guest waits for the host to carry out a resize.
HOST_RESIZE_TIMEOUT = 60.0
#: How often the guest looks for the host's answer.
POLL_INTERVAL = 0.005


class HostResizeFiles:
    """A :data:`~vmem_guest.conformance.checker.Resize` callback: ask the host by files.

    ``directory`` is shared with the host (the test VM's writable 9p share). For
    resize number ``n`` (1, 2, ... in :attr:`count`) the guest writes
    ``resize-<n>.json`` (``{"size": bytes}``, by rename so it appears whole)
    and waits for the host to set ``requested-size`` and write
    ``resize-<n>.done`` (``{"ok": true}`` or ``{"error": text}``). UsageError
    when the host refuses or does not answer within ``timeout`` seconds.
    """

    def __init__(self, directory: Path, timeout: float = HOST_RESIZE_TIMEOUT) -> None:
        self.directory = directory
        self.timeout = timeout
        self.count = 0

    def __call__(self, size: int) -> None:
        self.count += 1
        request = self.directory / f"resize-{self.count}.json"
        self._ask(request, size)
        answer = self._answer(request)
        if not answer.get("ok"):
            raise UsageError(f"the host refused resize to {size:#x}: {answer.get('error')}")

    def _ask(self, request: Path, size: int) -> None:
        partial = request.with_suffix(".tmp")
        partial.write_text(json.dumps({"size": size}))
        os.rename(partial, request)

    def _answer(self, request: Path) -> dict[str, object]:
        done = request.with_suffix(".done")
        deadline = time.monotonic() + self.timeout
        while not done.exists():
            if time.monotonic() > deadline:
                raise UsageError(
                    f"the host did not answer resize request {request} in {self.timeout:g} s"
                )
            time.sleep(POLL_INTERVAL)
        answer: dict[str, object] = json.loads(done.read_text() or "{}")
        return answer
