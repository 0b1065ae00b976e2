"""Shared test fixtures: tiny images, volumes and image frames with masks and sites.

Everything is small (a few 32 px images) so that tests stay fast on two CPU cores.
"""

from __future__ import annotations

import os

# pytest-xdist runs several worker processes; each one's torch, OpenMP and BLAS would otherwise
# start one thread per core, and oversubscribed OpenMP threads spin-wait: on two cores the
# suite ran 8-10x slower with `pytest -n 2` than with one thread per worker. Set before torch is
# imported (here and in any process a test starts, which inherits the environment).
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _threads = str(max(1, (os.cpu_count() or 1) // max(1, _workers)))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from skorch.callbacks import Callback  # noqa: E402

from skrtl import make_image_frame  # noqa: E402

SIZE = 32


def blob_images(n: int = 12, size: int = SIZE, seed: int = 0):
    """Noisy images with a bright disc (class 1) or a dark diamond (class 0), and masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    X = rng.normal(0.0, 0.1, (n, size, size)).astype(np.float32)
    y = np.arange(n) % 2
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
        if y[i]:
            m = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2
            X[i][m] += 2.0
        else:
            m = abs(yy - cy) + abs(xx - cx) < size // 5
            X[i][m] -= 1.0
        masks[i] = m
    return X, y, masks


def square_images(n: int = 16, n_classes: int = 2, seed: int = 0, shape=(SIZE, SIZE)):
    """Noisy images ``(n, *shape)`` with a bright square whose brightness is the class."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    X = rng.normal(0.0, 0.3, (n, *shape)).astype(np.float32)
    for c in range(1, n_classes):
        X[y == c, 8:24, 8:24] += c
    return X, y


def blob_volumes(n: int = 8, depth: int = 6, size: int = SIZE, seed: int = 0):
    """Volumes ``(n, depth, size, size)`` with a cubic lesion mask on two middle slices."""
    rng = np.random.default_rng(seed)
    vols = rng.normal(size=(n, depth, size, size)).astype(np.float32)
    y = np.arange(n) % 2
    masks = np.zeros_like(vols, dtype=bool)
    masks[:, depth // 2 - 1 : depth // 2 + 1, 10:20, 10:20] = True
    vols[y == 1] += 0.5 * masks[y == 1]
    return vols, y, masks


@pytest.fixture
def images():
    """``(X, y)``: 12 tiny 2-D images of two classes."""
    X, y, _ = blob_images()
    return X, y


@pytest.fixture
def image_frame():
    """``(frame, y)``: the tiny images with masks, spacing and three sites."""
    X, y, masks = blob_images()
    sites = np.array(list("AAAABBBBCCCC"))
    frame = make_image_frame(X, masks=masks, spacing=(0.7, 0.7), sites=sites)
    return frame, y


@pytest.fixture
def volume_frame():
    """``(frame, y)``: 8 tiny volumes with lesion masks."""
    vols, y, masks = blob_volumes()
    return make_image_frame(list(vols), masks=list(masks), spacing=(2.0, 0.7, 0.7)), y


def trainable_weights(net) -> list[torch.Tensor]:
    """Copies of the trainable weights of a skorch net's module."""
    return [p.detach().clone() for p in net.module_.parameters() if p.requires_grad]


class WeightSnapshots(Callback):
    """Records the trainable weights at the start (``"begin"``) or end of every epoch."""

    def __init__(self, when):
        self.when = when

    def initialize(self):
        self.weights_ = []
        return self

    def on_epoch_begin(self, net, **kwargs):
        if self.when == "begin":
            self.weights_.append(trainable_weights(net))

    def on_epoch_end(self, net, **kwargs):
        if self.when == "end":
            self.weights_.append(trainable_weights(net))
