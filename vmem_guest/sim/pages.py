"""An in-process model of the kernel's memory-failure machinery (a PageControl).

:class:`FakePages` is for the simulator and the fuzzers: it does no I/O and uses
randomness only through the ``rng`` it is given, so a run is repeatable. It keeps
what Linux does to single pages (docs/protocol.md section 6):

* soft offline poisons a free page, migrates an in-use (movable) page first,
  refuses an unmovable page (EIO), a pinned one (EBUSY) and a pfn outside online
  memory (EIO: ``pfn_to_online_page`` fails), and answers 0 for a page that is
  already poisoned;
* the faults that make a single write untrustworthy: a lost race answers 0
  without poisoning (6.1), a migration target can be a free page of the same
  2 MiB group, and a free page of the group can be allocated between writes;
* unpoison frees a poisoned page and refuses (EBUSY) any other;
* onlining a block re-initialises its struct pages: every page is free and
  unpoisoned again, but the kernel's poisoned-page count does not come down, so
  HardwareCorrupted stays high (``leaked``), as on 6.1.

Page states are drawn lazily, the first time a page is looked at, and kept in
dicts per 2 MiB group: a region of any size costs nothing until it is touched.
"""

from __future__ import annotations

import enum
import errno
import random
from collections.abc import Callable, Iterable, Sequence

from vmem_guest.errors import KernelError, PageRefused
from vmem_guest.pages import FLAG_READ_BATCH
from vmem_guest.sim.kernel import KernelOp

#: The operations FakePages can be made to refuse (:meth:`FakePages.refuse`).
PAGE_OPS = frozenset({KernelOp.SOFT_OFFLINE, KernelOp.UNPOISON})

#: The group a migration target or a reallocation stays in (a subblock of the
#: in-kernel driver; the pageblock of x86-64).
GROUP_BYTES = 2 << 20


class PageState(enum.Enum):
    """What one page is, as far as soft offline cares."""

    FREE = "free"
    IN_USE = "in use"  # movable: soft offline migrates it away first
    UNMOVABLE = "unmovable"  # kernel memory (slab, page tables): soft offline says EIO
    PINNED = "pinned"  # long-term pinned (DMA): migration fails, EBUSY
    POISONED = "poisoned"  # PG_hwpoison: out of use until unpoisoned


def _everything_online(pfn: int) -> bool:
    return True


class FakePages:
    """PageControl in memory, with the kernel's faults at chosen rates.

    ``unmovable`` and ``pinned`` are sets of pfns that soft offline refuses (they
    may be changed at any time); the ``*_rate`` arguments are probabilities per
    write. Counters: ``soft_offline_writes``, ``unpoison_writes``, ``flag_reads``
    (reads of FLAG_READ_BATCH pages, as ProcPages counts its preads),
    ``unpoisoned``, ``leaked``, and how often each fault happened
    (``lost_races``, ``migrations_in_range``, ``reallocations``).
    """

    def __init__(
        self,
        *,
        rng: random.Random | None = None,
        page_size: int = 4096,
        online: Callable[[int], bool] = _everything_online,
        in_use_rate: float = 0.5,
        unmovable: Iterable[int] = (),
        pinned: Iterable[int] = (),
        lost_race_rate: float = 0.0,
        migration_in_range_rate: float = 0.0,
        reallocate_rate: float = 0.0,
        unavailable: str | None = None,
    ) -> None:
        self.rng = rng if rng is not None else random.Random(0)
        self.page_size = page_size
        self.group_pages = max(1, GROUP_BYTES // page_size)
        self.online = online
        self.in_use_rate = in_use_rate
        self.unmovable: set[int] = set(unmovable)
        self.pinned: set[int] = set(pinned)
        self.lost_race_rate = lost_race_rate
        self.migration_in_range_rate = migration_in_range_rate
        self.reallocate_rate = reallocate_rate
        self.unavailable = unavailable
        self.soft_offline_writes = 0
        self.unpoison_writes = 0
        self.flag_reads = 0
        self.unpoisoned = 0
        self.leaked = 0
        self.lost_races = 0
        self.migrations_in_range = 0
        self.reallocations = 0
        # group index -> pfn -> FREE, IN_USE or POISONED, for pages already looked at.
        self._groups: dict[int, dict[int, PageState]] = {}
        # Groups onlined since: their pages not yet looked at are free, not drawn.
        self._fresh_groups: set[int] = set()
        self._poisoned_pages = 0
        #: Operations refused, each with its errno and the chance of a refusal per call,
        #: until :meth:`stop_refusing`.
        self.refusing: dict[KernelOp, tuple[int, float]] = {}
        self.refused: dict[KernelOp, int] = dict.fromkeys(PAGE_OPS, 0)

    def refuse(self, op: KernelOp, err: int, rate: float = 1.0) -> None:
        """Refuse every soft offline (of a page not yet poisoned) or every unpoison (of
        a poisoned page) with ``err`` from now on, or each with probability ``rate``
        (drawn from ``rng``); the page stays as it is."""
        if op not in PAGE_OPS:
            raise ValueError(f"{op.value} is a memory block operation (sim.kernel)")
        self.refusing[op] = (err, rate)

    def stop_refusing(self) -> None:
        self.refusing.clear()

    def _refusal(self, op: KernelOp) -> int | None:
        refusal = self.refusing.get(op)
        if refusal is None:
            return None
        err, rate = refusal
        if rate < 1.0 and self.rng.random() >= rate:
            return None
        self.refused[op] += 1
        return err

    # --- PageControl -------------------------------------------------------------

    def unavailable_reason(self) -> str | None:
        return self.unavailable

    def soft_offline(self, pfn: int) -> None:
        """Linux's order (soft_offline_page): no online page, already poisoned,
        then refusals, then the page is taken (a free one) or migrated (in use)."""
        self.soft_offline_writes += 1
        if not self.online(pfn):
            raise PageRefused(pfn, errno.EIO, "not an online page")
        self._maybe_reallocate(pfn)
        state = self.state(pfn)
        if state is PageState.POISONED:
            return
        err = self._refusal(KernelOp.SOFT_OFFLINE)
        if err is not None:
            raise PageRefused(pfn, err, "refused")
        if state is PageState.PINNED:
            raise PageRefused(pfn, errno.EBUSY, "pinned: migration failed")
        if state is PageState.UNMOVABLE:
            raise PageRefused(pfn, errno.EIO, "unmovable page")
        if self._happens(self.lost_race_rate):
            self.lost_races += 1
            return
        if state is PageState.IN_USE:
            self._migrate_away(pfn)
        self._store(pfn, PageState.POISONED)

    def soft_offline_pages(self, pfns: Sequence[int]) -> None:
        """Page by page through :meth:`soft_offline` (subclasses hook each write)."""
        for pfn in pfns:
            self.soft_offline(pfn)

    def poisoned(self, first_pfn: int, count: int) -> list[bool]:
        self.flag_reads += -(-count // FLAG_READ_BATCH)  # as many as ProcPages's preads
        return [self.is_poisoned(pfn) for pfn in range(first_pfn, first_pfn + count)]

    def unmovable_groups(self, first_pfn: int, group_pages: int, groups: int) -> list[bool]:
        """The ``unmovable`` pfns not poisoned, by run (no page state is drawn)."""
        self.flag_reads += -(-groups * group_pages // FLAG_READ_BATCH)
        answer = [False] * groups
        end = first_pfn + groups * group_pages
        for pfn in self.unmovable:
            if first_pfn <= pfn < end and not self.is_poisoned(pfn):
                answer[(pfn - first_pfn) // group_pages] = True
        return answer

    def unpoison(self, pfn: int) -> None:
        self.unpoison_writes += 1
        if self._stored(pfn) is not PageState.POISONED:
            raise KernelError("unpoison", None, errno.EBUSY, f"pfn {pfn:#x} is not poisoned")
        err = self._refusal(KernelOp.UNPOISON)
        if err is not None:
            raise KernelError("unpoison", None, err, f"pfn {pfn:#x} stays poisoned")
        self._store(pfn, PageState.FREE)
        self.unpoisoned += 1

    def unpoison_pages(self, pfns: Sequence[int]) -> None:
        """Page by page through :meth:`unpoison` (subclasses hook each write)."""
        for pfn in pfns:
            self.unpoison(pfn)

    def hardware_corrupted_bytes(self) -> int | None:
        return (self._poisoned_pages + self.leaked) * self.page_size

    # --- memory blocks -----------------------------------------------------------

    def block_onlined(self, first_pfn: int, count: int) -> None:
        """``online_pages`` re-initialised the struct pages of the range and freed
        them all (docs/protocol.md section 6): PG_hwpoison is gone, the kernel's
        poisoned-page count is not lowered (counted in ``leaked``)."""
        end = first_pfn + count
        for group in range(first_pfn // self.group_pages, -(-end // self.group_pages)):
            lo = max(first_pfn, group * self.group_pages)
            hi = min(end, (group + 1) * self.group_pages)
            if hi - lo == self.group_pages:
                self._wipe_group(group)
            else:
                for pfn in range(lo, hi):
                    self._wipe_page(pfn)

    def block_offlined(self, first_pfn: int, count: int) -> None:
        """Offlining keeps every page's flags (poisoned pages are skipped): nothing to do."""

    # --- for tests and fuzzers ---------------------------------------------------

    def state(self, pfn: int) -> PageState:
        """The page's state, drawn (and kept) the first time the page is looked at."""
        if pfn in self.pinned:
            stored = self._stored(pfn)
            return PageState.POISONED if stored is PageState.POISONED else PageState.PINNED
        if pfn in self.unmovable and self._stored(pfn) is not PageState.POISONED:
            return PageState.UNMOVABLE
        group = self._groups.setdefault(pfn // self.group_pages, {})
        state = group.get(pfn)
        if state is None:
            state = group[pfn] = self._first_state(pfn)
        return state

    def is_poisoned(self, pfn: int) -> bool:
        return self._stored(pfn) is PageState.POISONED

    def poisoned_set(self) -> set[int]:
        """Every poisoned pfn."""
        return {
            pfn
            for group in self._groups.values()
            for pfn, state in group.items()
            if state is PageState.POISONED
        }

    # --- inside ------------------------------------------------------------------

    def _happens(self, rate: float) -> bool:
        """A fault at ``rate``; no draw at rate 0, so unused faults change no run."""
        return rate > 0.0 and self.rng.random() < rate

    def _first_state(self, pfn: int) -> PageState:
        if pfn // self.group_pages in self._fresh_groups:
            return PageState.FREE
        return PageState.IN_USE if self.rng.random() < self.in_use_rate else PageState.FREE

    def _stored(self, pfn: int) -> PageState | None:
        group = self._groups.get(pfn // self.group_pages)
        return None if group is None else group.get(pfn)

    def _store(self, pfn: int, state: PageState) -> None:
        group = self._groups.setdefault(pfn // self.group_pages, {})
        if group.get(pfn) is PageState.POISONED:
            self._poisoned_pages -= 1
        if state is PageState.POISONED:
            self._poisoned_pages += 1
        group[pfn] = state

    def _free_pages_of_group(self, pfn: int) -> list[int]:
        """The other free pages of ``pfn``'s group (drawn if not yet looked at)."""
        first = pfn - pfn % self.group_pages
        return [
            other
            for other in range(first, first + self.group_pages)
            if other != pfn and self.online(other) and self.state(other) is PageState.FREE
        ]

    def _allocate_in_group(self, pfn: int) -> bool:
        """Make a random free page of ``pfn``'s group in use; False if there is none."""
        free = self._free_pages_of_group(pfn)
        if not free:
            return False
        self._store(self.rng.choice(free), PageState.IN_USE)
        return True

    def _migrate_away(self, pfn: int) -> None:
        """The migration target is outside the group, or (at the rate) a free page of it."""
        if self._happens(self.migration_in_range_rate) and self._allocate_in_group(pfn):
            self.migrations_in_range += 1

    def _maybe_reallocate(self, pfn: int) -> None:
        """Between two writes the allocator may hand out a free page of the group."""
        if self._happens(self.reallocate_rate) and self._allocate_in_group(pfn):
            self.reallocations += 1

    def _wipe_group(self, group: int) -> None:
        pages = self._groups.pop(group, {})
        wiped = sum(state is PageState.POISONED for state in pages.values())
        self._poisoned_pages -= wiped
        self.leaked += wiped
        self._fresh_groups.add(group)

    def _wipe_page(self, pfn: int) -> None:
        if self._stored(pfn) is PageState.POISONED:
            self.leaked += 1
        self._store(pfn, PageState.FREE)
