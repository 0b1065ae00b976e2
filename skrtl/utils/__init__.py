"""Shared machinery of skrtl: the one home of caches, seeds, hooks, devices and hashes.

Every skrtl module takes these helpers from here instead of writing its own (see
``docs/architecture.md``). The names are stable within skrtl but are not part of the public,
documented API of the package.
"""

from ._cache import LRUCache, nbytes_of
from ._cells import is_missing_cell, is_path_cell
from ._device import bf16_supported, can_fuse_on_cpu, resolve_device
from ._disk_cache import DiskCache, open_disk_cache
from ._files import check_writable_dir
from ._hashing import fingerprint, hash_array
from ._hooks import StopForward, call_order, capture_outputs, forward_hooks, stop_after
from ._indexing import index_params
from ._labels import check_class_labels, missing_rows
from ._postgres import find_postgres_bin, throwaway_postgres
from ._proba import PROBA_FLOOR, THRESHOLD_METRICS, choose_threshold, reweight_posteriors
from ._random import derive_seed, root_seed

__all__ = [
    "PROBA_FLOOR",
    "THRESHOLD_METRICS",
    "DiskCache",
    "LRUCache",
    "StopForward",
    "bf16_supported",
    "call_order",
    "can_fuse_on_cpu",
    "capture_outputs",
    "check_class_labels",
    "check_writable_dir",
    "choose_threshold",
    "derive_seed",
    "find_postgres_bin",
    "fingerprint",
    "forward_hooks",
    "hash_array",
    "index_params",
    "missing_rows",
    "is_missing_cell",
    "is_path_cell",
    "nbytes_of",
    "open_disk_cache",
    "resolve_device",
    "reweight_posteriors",
    "root_seed",
    "stop_after",
    "throwaway_postgres",
]
