"""Differential conformance fuzzing: a virtio-mem device against the QEMU-faithful model.

``vmem-guest fuzz`` generates sequences of raw requests with hypothesis (PLUG,
UNPLUG, UNPLUG_ALL and STATE with ranges that are valid, misaligned, empty,
overflowing 2**64, outside the usable region or the device region, beyond
``requested_size``, plus any 64-bit address and 16-bit count), sends each
sequence to the device under test and to a :class:`~vmem_guest.sim.DeviceModel`
built from the device's own config, and compares after every request: the
response type, the STATE answer, and every config field (``plugged_size``,
``usable_region_size``, ``requested_size``, geometry). A mismatch is shrunk by
hypothesis to a minimal sequence, reported, and saved as a regression example.

What is sent where:

* Requests that would break QEMU's device (``virtio_error``: shorter than 24
  bytes, unknown type) go to the model only; the model must refuse them
  (DeviceBroken) and is then reset, as a driver would reset the device.
* Host resizes (``qom-set requested-size``) need the host. The device under
  test is resized through a ``resize`` callback; without one the fuzzer works
  within the current ``requested_size`` and generates no resizes. In a guest,
  :class:`HostResizeFiles` asks a harness on the host through a shared
  directory (``vmem-guest fuzz --host-resize DIR``, served by
  ``scripts/conformance.py``); the unit tests resize a second model.

The device is left as it was found: the fuzzer starts only when
``plugged_size`` is 0 (it never unplugs memory it did not plug), sends
UNPLUG_ALL after every example (and restores ``requested_size`` when it
resized), and never probes or onlines anything: plugged memory is never
touched by the guest. An UNPLUG_ALL may shrink ``usable_region_size`` to what
the current ``requested_size`` implies (the spec allows it; QEMU does it).

The package, one job a module:

* :mod:`~vmem_guest.conformance.steps`: :class:`~.steps.Step`, one concrete
  input, and its JSON form;
* :mod:`~vmem_guest.conformance.kinds`: :class:`~.kinds.Kind` and
  :class:`~.kinds.Action`, what is drawn, and the table of resolvers that turns
  an action into a step against the model's state;
* :mod:`~vmem_guest.conformance.strategies`: the hypothesis strategies (kinds
  and their weights, sequences);
* :mod:`~vmem_guest.conformance.findings`: differences, trace entries, and the
  two failures, :class:`Mismatch` and :class:`DeviceLost`;
* :mod:`~vmem_guest.conformance.compare`: answers and config fields as compared;
* :mod:`~vmem_guest.conformance.checker`: :class:`~.checker.Checker`, one
  device and a fresh model per example, step by step, and the clean-up;
* :mod:`~vmem_guest.conformance.result`: :class:`FuzzResult` and its report;
* :mod:`~vmem_guest.conformance.run`: :func:`fuzz`, the hypothesis run;
* :mod:`~vmem_guest.conformance.saved`: a failure written as JSON, read back
  (:func:`load_steps`) and replayed (:func:`replay`);
* :mod:`~vmem_guest.conformance.host_resize`: :class:`HostResizeFiles`;
* :mod:`~vmem_guest.conformance.pci_runner`: :func:`fuzz_pci_device`, the engine
  around a real PCI function (selection, lock, binding, refusals).

The package's API, re-exported here: :func:`fuzz` (any
:class:`~vmem_guest.device.RequestChannel`), :func:`fuzz_pci_device` (what
``vmem-guest fuzz`` runs), :class:`HostResizeFiles` and the :data:`Resize`
callback type, :class:`FuzzResult`, :func:`replay` and :func:`load_steps`,
:class:`Mismatch` and :class:`DeviceLost`. The rest is reached through its
module.
"""

from vmem_guest.conformance.checker import Resize
from vmem_guest.conformance.findings import DeviceLost, Mismatch
from vmem_guest.conformance.host_resize import HostResizeFiles
from vmem_guest.conformance.pci_runner import fuzz_pci_device
from vmem_guest.conformance.result import FuzzResult
from vmem_guest.conformance.run import fuzz
from vmem_guest.conformance.saved import load_steps, replay

__all__ = [
    "DeviceLost",
    "FuzzResult",
    "HostResizeFiles",
    "Mismatch",
    "Resize",
    "fuzz",
    "fuzz_pci_device",
    "load_steps",
    "replay",
]
