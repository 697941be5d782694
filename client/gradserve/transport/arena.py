"""Slot allocation inside a fixed region (a shared-memory segment, a CUDA IPC pool)."""

from __future__ import annotations

import threading
from typing import Sequence

from gradserve.errors import invalid

ALIGN = 64   # JAX's CPU zero-copy import needs 64-byte alignment; GPUs like 256 (pools align up)


class Arena:
    """A first-fit allocator of ``align``-aligned slots in ``[0, size)``; thread-safe."""

    def __init__(self, size: int, align: int = ALIGN):
        self.size = size
        self.align = align
        self._free: list[tuple[int, int]] = [(0, size)]   # sorted (offset, length)
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a new slot of ``nbytes`` (rounded up to the alignment), or None if full."""
        need = max(self.align, -(-nbytes // self.align) * self.align)
        with self._lock:
            for i, (offset, length) in enumerate(self._free):
                if length >= need:
                    if length == need:
                        del self._free[i]
                    else:
                        self._free[i] = (offset + need, length - need)
                    self._used[offset] = need
                    return offset
        return None

    def free(self, offset: int) -> bool:
        """Return a slot; False if ``offset`` is not an allocated slot."""
        with self._lock:
            length = self._used.pop(offset, None)
            if length is None:
                return False
            self._free.append((offset, length))
            self._free.sort()
            merged: list[tuple[int, int]] = []
            for start, size in self._free:
                if merged and merged[-1][0] + merged[-1][1] == start:
                    merged[-1] = (merged[-1][0], merged[-1][1] + size)
                else:
                    merged.append((start, size))
            self._free = merged
            return True

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._used.values())


def check_slot(path: str, what: str, region: str, index: int, sizes: Sequence[int | None],
               offset: int, nbytes: int, want: int) -> None:
    """Refuse a reference to ``nbytes`` at ``offset`` of region ``index`` unless it holds
    exactly ``want`` bytes and lies inside that region (``sizes``: None where not in use)."""
    if nbytes != want:
        raise invalid(f"{path}: {what} slot holds {nbytes} bytes but dtype x shape needs {want}")
    size = sizes[index] if index < len(sizes) else None
    if size is None:
        raise invalid(f"{path}: {what} {region} {index} is not in use in this session")
    if offset > size or nbytes > size - offset:
        raise invalid(f"{path}: {what} slot [{offset}, +{nbytes}) lies outside the "
                      f"{size}-byte {region} {index}")
