"""Training-time augmentation of network inputs (fine-tuning): the built-in light
augmentation and the seeded per-sample application of any transform.

The built-in augmentation works on 2-D ``(C, H, W)`` inputs and, for the 3-D networks of
volumetric fine-tuning, on ``(C, D, H, W)`` volumes the same way: a left-right mirror, an
in-plane rotation (about the depth axis), a shift along every axis and an intensity jitter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "AugmentCollate",
    "LightAugment",
    "SampleAugmentLoader",
    "apply_sample_transform",
    "augment_batch",
    "augment_volume_batch",
]


class AugmentCollate:
    """Collate function that augments a training batch (a skorch ``iterator_train`` option).

    Random horizontal flip, rotation by up to ``max_rotation`` degrees, a shift of up to
    ``max_shift`` of the image size and an intensity jitter (contrast / brightness in
    normalised units). It draws from the global torch generator, which the fine-tuning
    estimator forks and seeds for every ensemble member.
    """

    def __init__(self, max_rotation=10.0, max_shift=0.05, contrast=0.1, brightness=0.1):
        self.max_rotation = max_rotation
        self.max_shift = max_shift
        self.contrast = contrast
        self.brightness = brightness

    def __call__(self, items):
        x, y = torch.utils.data.default_collate(items)
        if x.dim() == 5:
            return augment_volume_batch(x, self), y
        return augment_batch(x, self), y


def augment_batch(x: torch.Tensor, cfg: AugmentCollate) -> torch.Tensor:
    """Augmented copy of the NCHW batch ``x`` with the settings of ``cfg``."""
    n = x.shape[0]
    flip = torch.rand(n) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    angle = (torch.rand(n) * 2 - 1) * math.radians(cfg.max_rotation)
    shift = (torch.rand(n, 2) * 2 - 1) * 2 * cfg.max_shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # pad with the per-image minimum (background) rather than zero (= mid-grey after norm)
    lo = x.amin(dim=(2, 3), keepdim=True)
    x = F.grid_sample(x - lo, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x + lo
    c = 1 + (torch.rand(n, 1, 1, 1) * 2 - 1) * cfg.contrast
    b = (torch.rand(n, 1, 1, 1) * 2 - 1) * cfg.brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean + b


def augment_volume_batch(x: torch.Tensor, cfg: AugmentCollate) -> torch.Tensor:
    """Augmented copy of the NCDHW batch ``x``: the 3-D counterpart of :func:`augment_batch`.

    Left-right mirror (the width axis), rotation about the depth axis (in the axial plane),
    a shift along each axis and the same intensity jitter.
    """
    n = x.shape[0]
    flip = torch.rand(n) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(-1), x)
    angle = (torch.rand(n) * 2 - 1) * math.radians(cfg.max_rotation)
    shift = (torch.rand(n, 3) * 2 - 1) * 2 * cfg.max_shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero, one = torch.zeros(n), torch.ones(n)
    # affine_grid's coordinates are (x = width, y = height, z = depth)
    theta = torch.stack(
        [
            torch.stack([cos, -sin, zero, shift[:, 0]], 1),
            torch.stack([sin, cos, zero, shift[:, 1]], 1),
            torch.stack([zero, zero, one, shift[:, 2]], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    lo = x.amin(dim=(2, 3, 4), keepdim=True)
    x = F.grid_sample(x - lo, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x + lo
    c = 1 + (torch.rand(n, 1, 1, 1, 1) * 2 - 1) * cfg.contrast
    b = (torch.rand(n, 1, 1, 1, 1) * 2 - 1) * cfg.brightness
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    return (x - mean) * c + mean + b


# --------------------------------------------------------------------------------------------
# per-sample augmentation with seeds drawn in the main process (any number of workers)
# --------------------------------------------------------------------------------------------
class LightAugment:
    """The built-in light augmentation (:func:`augment_batch`) of one ``(C, H, W)`` network
    input (normalised units), for ``augment=True`` of the fine-tuning estimators."""

    def __init__(self, max_rotation=10.0, max_shift=0.05, contrast=0.1, brightness=0.1):
        self.max_rotation = max_rotation
        self.max_shift = max_shift
        self.contrast = contrast
        self.brightness = brightness

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # (C, D, H, W): a volume of a 3-D network
            return augment_volume_batch(x[None], self)[0]
        return augment_batch(x[None], self)[0]


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {str(t.dtype).removeprefix('torch.')} tensor of shape {tuple(t.shape)}"
    shape = getattr(t, "shape", None)
    dtype = getattr(t, "dtype", None)
    if shape is not None:
        return f"a {type(t).__name__} of dtype {dtype} and shape {tuple(shape)}"
    return f"a {type(t).__name__}"


def apply_sample_transform(transform, x: torch.Tensor, seed: int, *, name: str = "augment"):
    """``transform(x)`` with every random generator it may use seeded by ``seed``.

    torch's, NumPy's and Python's global generators are forked (saved, seeded, restored), and
    a MONAI ``Randomizable`` transform gets ``set_random_state(seed)``, so the result depends
    only on ``x`` and ``seed``, in the main process as in a DataLoader worker. The output must
    be a tensor (or array) of the shape and dtype of ``x``; anything else is a ``ValueError``
    naming the parameter ``name``.
    """
    import random

    import numpy as np

    seed = int(seed)
    np_state = np.random.get_state()  # noqa: NPY002 - forked and restored below
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)  # noqa: NPY002
            random.seed(seed)
            if hasattr(transform, "set_random_state"):  # MONAI Randomizable / Compose
                transform.set_random_state(seed=seed % 2**32)
            out = transform(x)
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    if isinstance(out, torch.Tensor) and type(out) is not torch.Tensor:
        out = out.as_subclass(torch.Tensor)  # e.g. MONAI's MetaTensor
    if (
        not isinstance(out, torch.Tensor)
        or tuple(out.shape) != tuple(x.shape)
        or out.dtype != x.dtype
    ):
        raise ValueError(
            f"{name}={transform!r} returned {_describe(out)} for {_describe(x)}; a per-sample "
            f"transform must return a tensor of the same shape and dtype (channels first, "
            "no resizing or cropping to another size: the network input size is input_size). "
            "Use size-preserving transforms (e.g. v2.RandomResizedCrop(size=input_size) "
            "instead of v2.RandomCrop) and keep float32."
        )
    return out


class _TransformedDataset(torch.utils.data.Dataset):
    """Items ``(transform(x), y)`` of a ``(x, y)`` dataset, indexed by ``(index, seed)``.

    With ``mean`` / ``std``, the transform sees the image before the network normalisation
    (``x * std + mean``) and its output is normalised again.
    """

    def __init__(self, dataset, transform, *, mean=None, std=None, name="augment"):
        self.dataset = dataset
        self.transform = transform
        self.mean = mean
        self.std = std
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        x, y = self.dataset[index]
        x = torch.as_tensor(x)
        if self.mean is not None:
            shape = (-1,) + (1,) * (x.ndim - 1)
            mean, std = self.mean.view(shape), self.std.view(shape)
            out = apply_sample_transform(self.transform, x * std + mean, seed, name=self.name)
            return ((out - mean) / std).contiguous(), y
        return apply_sample_transform(self.transform, x, seed, name=self.name), y


class _SeededBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(index, seed)``: the batches of ``batch_sampler``, each index paired with a
    seed drawn from ``generator`` (in the main process, in batch order)."""

    def __init__(self, batch_sampler, generator: torch.Generator):
        self.batch_sampler = batch_sampler
        self.generator = generator

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        for batch in self.batch_sampler:
            seeds = torch.randint(0, 2**62, (len(batch),), generator=self.generator).tolist()
            yield list(zip(batch, seeds))


class SampleAugmentLoader:
    """skorch ``iterator_train`` that augments every training sample with its own seed.

    It builds the loader ``loader(dataset, **kwargs)`` (skorch's arguments: batch size,
    shuffling, workers, ...) and keeps its order of batches, then pairs every sample of every
    batch with a seed from its own generator (seeded with ``seed``, carried across epochs), so
    that the augmented batches are the same with any ``num_workers``. Shuffling still draws
    from the caller's (forked, seeded) torch generator, as without augmentation.

    Parameters
    ----------
    transform : callable
        Per-sample transform of a ``(C, H, W)`` (or ``(C, D, H, W)``) float tensor.
    seed : int
    mean, std : sequence of float, optional
        Network normalisation: the transform then sees un-normalised images.
    loader : type, default=torch.utils.data.DataLoader
        The loader whose sampling is kept (e.g. an event-stratified loader).
    name : str, default="augment"
        Parameter named in error messages.
    """

    def __init__(self, transform, *, seed, mean=None, std=None, loader=None, name="augment"):
        self.transform = transform
        self.seed = int(seed)
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32)
        self.loader = loader
        self.name = name
        self._generator = None

    def __call__(self, dataset, **kwargs):
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        base = (self.loader or torch.utils.data.DataLoader)(dataset, **kwargs)
        for key in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
            kwargs.pop(key, None)
        kwargs.setdefault("collate_fn", base.collate_fn)
        wrapped = _TransformedDataset(
            dataset, self.transform, mean=self.mean, std=self.std, name=self.name
        )
        return torch.utils.data.DataLoader(
            wrapped,
            batch_sampler=_SeededBatchSampler(base.batch_sampler, self._generator),
            **kwargs,
        )

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._generator is not None:
            state["_generator"] = self._generator.get_state()
        return state

    def __setstate__(self, state):
        gen_state = state.get("_generator")
        self.__dict__.update(state)
        if gen_state is not None:
            self._generator = torch.Generator()
            self._generator.set_state(gen_state)
