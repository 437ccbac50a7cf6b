"""PCI addresses, as Linux names a function: ``DDDD:BB:DD.F`` in lower case.

The kernel's ``pci_name()`` gives a function's sysfs directory name and the name
VFIO opens it by: domain (4 hex digits; more for VMD domains), bus, device (0-0x1f)
and function (0-7). People also write the short form ``BB:DD.F`` (domain 0000) and
upper case; :func:`normalize_bdf` accepts both, :func:`check_bdf` only the canonical
form.
"""

from __future__ import annotations

import re

from vmem_guest.errors import TransportError, UsageError

_BDF_RE = re.compile(
    r"(?:(?P<domain>[0-9a-fA-F]{4,8}):)?(?P<bus>[0-9a-fA-F]{2}):"
    r"(?P<dev>[0-9a-fA-F]{2})\.(?P<fn>[0-7])"
)
_MAX_DEVICE = 0x1F


def canonical_bdf(text: str) -> str | None:
    """``0000:00:03.0`` from ``0000:00:03.0`` or ``00:03.0`` (any case, surrounding
    whitespace ignored); None when ``text`` is not a PCI address."""
    m = _BDF_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None or int(m["dev"], 16) > _MAX_DEVICE:
        return None
    domain = m["domain"] or "0000"
    return f"{domain}:{m['bus']}:{m['dev']}.{m['fn']}".lower()


def normalize_bdf(text: str) -> str:
    """:func:`canonical_bdf` of an address someone typed; UsageError when it is none."""
    full = canonical_bdf(text)
    if full is None:
        raise UsageError(
            f"not a PCI address: {text!r} (expected DDDD:BB:DD.F or BB:DD.F)", bdf=text
        )
    return full


def check_bdf(bdf: str) -> str:
    """``bdf`` when it is a canonical address (as sysfs and VFIO name functions);
    TransportError otherwise."""
    if canonical_bdf(bdf) != bdf:
        raise TransportError(f"not a PCI address: {bdf!r}", bdf=bdf)
    return bdf
