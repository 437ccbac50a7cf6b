"""A sorted set of small non-negative integers, as a two-level bitmap.

The tracker's in-memory state keeps the units of a region in sets by what
they hold (empty, partial, full and offline, ...), and the planner asks for
the lowest or highest member, or walks them in order from one end. A region of
16 TiB in 128 MiB memory blocks has 131,072 units; these queries must not cost
a walk over all of them.

Layout: ``_words[w]`` holds members ``64*w .. 64*w+63`` (bit ``i % 64``);
``_summary`` has bit ``w`` set exactly when ``_words[w]`` is non-zero. Finding
the next member is one shift of ``_summary`` (an integer of ``size / 64``
bits, handled by CPython in C) plus one word: flat for any size this project
meets. Adding or removing a member is O(1).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

WORD_BITS = 64
_WORD_MASK = (1 << WORD_BITS) - 1


def _lowest_bit(value: int) -> int:
    return (value & -value).bit_length() - 1


class IndexSet:
    """Members are ints in ``0 .. size-1``; iteration is ascending."""

    __slots__ = ("_len", "_summary", "_words", "size")

    def __init__(self, size: int, members: Iterable[int] = ()) -> None:
        if size < 0:
            raise ValueError(f"size {size} < 0")
        self.size = size
        self._words = [0] * (-(-size // WORD_BITS))
        self._summary = 0
        self._len = 0
        for member in members:
            self.add(member)

    @classmethod
    def full(cls, size: int) -> IndexSet:
        """Every int of ``0 .. size-1`` (built word by word, not member by member)."""
        result = cls(size)
        whole, rest = divmod(size, WORD_BITS)
        result._words[:whole] = [_WORD_MASK] * whole
        if rest:
            result._words[whole] = (1 << rest) - 1
        result._summary = (1 << len(result._words)) - 1
        result._len = size
        return result

    def _check(self, member: int) -> None:
        if not 0 <= member < self.size:
            raise IndexError(f"{member} outside 0..{self.size - 1}")

    def add(self, member: int) -> None:
        self._check(member)
        word, bit = divmod(member, WORD_BITS)
        old = self._words[word]
        if not old >> bit & 1:
            self._words[word] = old | 1 << bit
            self._summary |= 1 << word
            self._len += 1

    def discard(self, member: int) -> None:
        self._check(member)
        word, bit = divmod(member, WORD_BITS)
        old = self._words[word]
        if old >> bit & 1:
            new = old & ~(1 << bit)
            self._words[word] = new
            if not new:
                self._summary &= ~(1 << word)
            self._len -= 1

    def __contains__(self, member: object) -> bool:
        if not isinstance(member, int) or not 0 <= member < self.size:
            return False
        word, bit = divmod(member, WORD_BITS)
        return bool(self._words[word] >> bit & 1)

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def first(self, start: int = 0) -> int | None:
        """The lowest member ``>= start``, or None."""
        if start >= self.size:
            return None
        start = max(start, 0)
        word, bit = divmod(start, WORD_BITS)
        here = self._words[word] >> bit
        if here:
            return start + _lowest_bit(here)
        later = self._summary >> (word + 1)
        if not later:
            return None
        word += 1 + _lowest_bit(later)
        return word * WORD_BITS + _lowest_bit(self._words[word])

    def last(self, stop: int | None = None) -> int | None:
        """The highest member ``< stop`` (default: the highest), or None."""
        stop = self.size if stop is None else min(stop, self.size)
        if stop <= 0:
            return None
        word, bit = divmod(stop - 1, WORD_BITS)
        here = self._words[word] & ((2 << bit) - 1)
        if here:
            return word * WORD_BITS + here.bit_length() - 1
        earlier = self._summary & ((1 << word) - 1)
        if not earlier:
            return None
        word = earlier.bit_length() - 1
        return word * WORD_BITS + self._words[word].bit_length() - 1

    def ascending(self, start: int = 0) -> Iterator[int]:
        """Members ``>= start``, lowest first (the set may change between items)."""
        member = self.first(start)
        while member is not None:
            yield member
            member = self.first(member + 1)

    def descending(self, stop: int | None = None) -> Iterator[int]:
        """Members ``< stop``, highest first (the set may change between items)."""
        member = self.last(stop)
        while member is not None:
            yield member
            member = self.last(member)

    def __iter__(self) -> Iterator[int]:
        return self.ascending()

    def count_below(self, stop: int) -> int:
        """Members ``< stop``. O(stop / 64): for rare paths only."""
        stop = max(0, min(stop, self.size))
        word, bit = divmod(stop, WORD_BITS)
        below = sum(w.bit_count() for w in self._words[:word])
        if bit:
            below += (self._words[word] & ((1 << bit) - 1)).bit_count()
        return below

    def __repr__(self) -> str:
        shown = list(self.ascending())
        return f"IndexSet(size={self.size}, {shown[:8]}{'...' if len(shown) > 8 else ''})"
