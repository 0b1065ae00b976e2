"""Content hashes: of arrays (cache keys) and of a network's exact numerical state."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

__all__ = ["fingerprint", "hash_array"]


def hash_array(h, arr: np.ndarray) -> None:
    """Feed ``arr``'s dtype, shape and bytes into the hash object ``h``."""
    arr = np.ascontiguousarray(arr)
    h.update(str(arr.dtype).encode())
    h.update(repr(arr.shape).encode())
    h.update(arr.tobytes())


def fingerprint(module: nn.Module) -> str:
    """Hash of every parameter and buffer of ``module`` (its exact numerical state)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        h.update(name.encode())
        t = t.detach()
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
