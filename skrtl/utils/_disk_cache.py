"""A persistent, size-bounded cache of feature vectors on disk, shared by processes and runs.

Backed by ``diskcache`` (SQLite in WAL mode plus files), which is safe with concurrent readers
and writers in several processes and evicts the least recently used entries beyond its size
limit. Values are stored as raw bytes (arrays) or JSON (named features), never pickled, so a
cache folder cannot execute code when it is read.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np

__all__ = ["DiskCache", "open_disk_cache"]

_OPEN: dict[tuple, DiskCache] = {}
_OPEN_LOCK = threading.Lock()


class DiskCache:
    """Feature vectors by key in a folder (see the module documentation).

    Parameters
    ----------
    directory : str or path
        Folder of the cache (created if needed); several processes may use it at once.
    max_mb : float, default=2048
        Size bound in MiB; least recently used entries are evicted beyond it.
    """

    def __init__(self, directory, *, max_mb: float = 2048):
        try:
            import diskcache
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise ImportError(
                "cache_dir needs the 'diskcache' package: pip install diskcache"
            ) from exc
        self.directory = os.fspath(directory)
        self.max_mb = float(max_mb)
        self._cache = diskcache.Cache(
            self.directory,
            size_limit=int(self.max_mb * 2**20),
            eviction_policy="least-recently-used",
            statistics=True,
        )

    def get_array(self, key: bytes, *, dtype, size: int) -> np.ndarray | None:
        """The stored vector of ``key`` (``size`` values of ``dtype``), or None."""
        raw = self._cache.get(key)
        if raw is None:
            return None
        arr = np.frombuffer(raw, dtype=dtype)
        return arr.copy() if arr.size == size else None

    def put_array(self, key: bytes, value: np.ndarray) -> None:
        """Store a vector under ``key``."""
        self._cache.set(key, np.ascontiguousarray(value).tobytes())

    def get_json(self, key: bytes):
        """The stored JSON value of ``key``, or None."""
        raw = self._cache.get(key)
        return None if raw is None else json.loads(raw)

    def put_json(self, key: bytes, value) -> None:
        """Store a JSON-serialisable value under ``key``."""
        self._cache.set(key, json.dumps(value).encode())

    def info(self) -> dict:
        """``entries``, ``bytes``, ``max_bytes``, ``hits`` and ``misses`` (this process)."""
        hits, misses = self._cache.stats()
        return {
            "entries": len(self._cache),
            "bytes": int(self._cache.volume()),
            "max_bytes": int(self.max_mb * 2**20),
            "hits": int(hits),
            "misses": int(misses),
        }

    def clear(self) -> None:
        """Delete every entry."""
        self._cache.clear()


def open_disk_cache(directory, *, max_mb: float = 2048) -> DiskCache:
    """The process's :class:`DiskCache` of ``directory`` (opened once, then reused)."""
    key = (os.path.abspath(os.fspath(directory)), float(max_mb), os.getpid())
    with _OPEN_LOCK:
        cache = _OPEN.get(key)
        if cache is None:
            cache = _OPEN[key] = DiskCache(directory, max_mb=max_mb)
    return cache
