"""One thread-safe LRU cache, bounded by its number of entries or by the bytes it holds."""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["LRUCache", "nbytes_of"]


def nbytes_of(value: Any) -> int:
    """Size of ``value`` in bytes: ``.nbytes`` of arrays and tensors, else ``sys.getsizeof``."""
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if hasattr(value, "element_size") and hasattr(value, "numel"):  # torch tensors
        return int(value.element_size() * value.numel())
    return sys.getsizeof(value)


class LRUCache:
    """Mapping that keeps its most recently used entries, safe to share between threads.

    Parameters
    ----------
    max_items : int or None, default=None
        Keep at most this many entries (``None``: no bound on the count).
    max_bytes : int or None, default=None
        Keep at most this many bytes of values, as measured by ``sizeof`` (``None``: no bound
        on the size). A value larger than the bound is not stored.
    sizeof : callable, default=nbytes_of
        Size of a value in bytes.

    Notes
    -----
    Every operation takes one lock, so concurrent ``get`` / ``put`` calls never see a
    half-updated cache. ``hits`` and ``misses`` count the ``get`` calls.
    """

    def __init__(
        self,
        max_items: int | None = None,
        *,
        max_bytes: int | None = None,
        sizeof: Callable[[Any], int] = nbytes_of,
    ):
        for name, bound in (("max_items", max_items), ("max_bytes", max_bytes)):
            if bound is not None and (not isinstance(bound, int) or bound < 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {bound!r}.")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._sizeof = sizeof
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value of ``key`` (marked as most recently used), or ``default``."""
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += 1
                return default
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value`` under ``key``, dropping the least recently used entries as needed."""
        size = self._sizeof(value) if self.max_bytes is not None else 0
        if self.max_bytes is not None and size > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._data[key] = (value, size)
            self._bytes += size
            self._evict()

    def _evict(self) -> None:
        while self._data and (
            (self.max_items is not None and len(self._data) > self.max_items)
            or (self.max_bytes is not None and self._bytes > self.max_bytes)
        ):
            _, (_, size) = self._data.popitem(last=False)
            self._bytes -= size

    def resize(self, *, max_items: int | None = None, max_bytes: int | None = None) -> None:
        """Change the bounds (``None`` keeps a bound as it is) and evict what no longer fits."""
        with self._lock:
            if max_items is not None:
                self.max_items = int(max_items)
            if max_bytes is not None:
                self.max_bytes = int(max_bytes)
            self._evict()

    def clear(self) -> None:
        """Drop every entry and reset the hit / miss counters."""
        with self._lock:
            self._data.clear()
            self._bytes = 0
            self.hits = 0
            self.misses = 0

    def info(self) -> dict:
        """``entries``, ``bytes``, ``max_items``, ``max_bytes``, ``hits`` and ``misses``."""
        with self._lock:
            return {
                "entries": len(self._data),
                "bytes": self._bytes,
                "max_items": self.max_items,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
            }

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)
