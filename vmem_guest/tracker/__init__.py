"""The shared-memory state tracker (docs/design.md, "The tracker").

One mmap'd file per device under ``/run/vmem-guest`` holds the per-memory-block
state and the subblock bitmap: the crash-safe record a restarted agent
recovers from and ``vmem-guest status`` reads live. The package, one job a module:

* :mod:`~vmem_guest.tracker.layout`: the ctypes structures (sizes pinned by tests);
* :mod:`~vmem_guest.tracker.snapshot`: value types, decoding a file, the consistency check;
* :mod:`~vmem_guest.tracker.state`: the owner's in-memory state, indexed for the planner;
* :mod:`~vmem_guest.tracker.owner`: :class:`Tracker`, the one writer;
* :mod:`~vmem_guest.tracker.files`: paths, the device lock, mapping, set aside, create;
* :mod:`~vmem_guest.tracker.reader`: :class:`TrackerReader`, the seqlock reader.
"""

from vmem_guest.tracker.files import (
    device_locked,
    list_trackers,
    lock_device,
    tracker_path,
)
from vmem_guest.tracker.layout import (
    DEFAULT_STATE_DIR,
    HEADER_SIZE,
    KEEP_SET_ASIDE,
    LAYOUTS,
    LOCK_SUFFIX,
    MAGIC,
    NO_INTENT,
    NODE_UNKNOWN,
    RECORD_SIZE,
    STATE_DIR_MODE,
    STATE_FILE_MODE,
    STATE_SUFFIX,
    VERSION,
    BlockRecordLayout,
    BrokenReason,
    DeviceStatus,
    TrackerHeader,
    write_in_progress,
)
from vmem_guest.tracker.owner import Tracker
from vmem_guest.tracker.reader import TrackerReader
from vmem_guest.tracker.snapshot import (
    BlockRecord,
    Intent,
    TrackerIdentity,
    TrackerSnapshot,
    consistency_problem,
    decode,
    state_disagreement,
    state_of,
)
from vmem_guest.tracker.state import RegionState, UnitClass

__all__ = [
    "DEFAULT_STATE_DIR",
    "HEADER_SIZE",
    "KEEP_SET_ASIDE",
    "LAYOUTS",
    "LOCK_SUFFIX",
    "MAGIC",
    "NODE_UNKNOWN",
    "NO_INTENT",
    "RECORD_SIZE",
    "STATE_DIR_MODE",
    "STATE_FILE_MODE",
    "STATE_SUFFIX",
    "VERSION",
    "BlockRecord",
    "BlockRecordLayout",
    "BrokenReason",
    "DeviceStatus",
    "Intent",
    "RegionState",
    "Tracker",
    "TrackerHeader",
    "TrackerIdentity",
    "TrackerReader",
    "TrackerSnapshot",
    "UnitClass",
    "consistency_problem",
    "decode",
    "device_locked",
    "list_trackers",
    "lock_device",
    "state_disagreement",
    "state_of",
    "tracker_path",
    "write_in_progress",
]
