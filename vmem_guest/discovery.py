"""Transitional: the names ``cli.py`` and ``conformance.py`` still import from here.

Finding and classifying virtio-mem PCI functions is :mod:`vmem_guest.pci`, PCI
addresses :mod:`vmem_guest.pci_address`, binding to vfio-pci and back
:mod:`vmem_guest.binding`. This module goes once those two callers import from there.
"""

from __future__ import annotations

from vmem_guest.binding import bind as bind
from vmem_guest.binding import unbind as unbind
from vmem_guest.pci import VirtioMemPci as VirtioMemPci
from vmem_guest.pci import get_device as get_device
from vmem_guest.pci import list_devices as list_devices
from vmem_guest.pci_address import normalize_bdf as normalize_bdf
