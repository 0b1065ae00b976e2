"""Loaders for MedMNIST ``.npz`` files (by path, or through the ``medmnist`` package)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .._imaging import make_image_frame

__all__ = ["load_medmnist", "shared_data_dir"]

_SPLITS = ("train", "val", "test")


def shared_data_dir() -> Path | None:
    """Folder of shared data files, or ``None`` when there is none.

    The environment variable ``SKRTL_DATA_DIR`` wins; otherwise ``../shared/data`` next to the
    repository (source checkouts) is used when it exists.

    Returns
    -------
    pathlib.Path or None
    """
    env = os.environ.get("SKRTL_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        return path if path.is_dir() else None
    path = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return path if path.is_dir() else None


def _resolve(path) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        return p
    if p.suffix == "" and p.parent == Path("."):  # a bare name such as "breastmnist"
        shared = shared_data_dir()
        if shared is not None and (shared / f"{p.name}.npz").is_file():
            return shared / f"{p.name}.npz"
    return p


def _download(path: Path, split: str) -> None:
    try:
        import medmnist
        from medmnist import INFO
    except ImportError:
        raise ImportError(
            "download=True needs the 'medmnist' package (pip install medmnist) and network "
            f"access; otherwise download {path.name} yourself and pass its path."
        ) from None
    flag = path.stem.lower()
    if flag not in INFO:
        raise ValueError(
            f"cannot download {path.name!r}: {flag!r} is not a MedMNIST data set; known names "
            f"are e.g. {sorted(INFO)[:6]!r}. Name the file '<flag>.npz', e.g. breastmnist.npz."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    data_class = getattr(medmnist, INFO[flag]["python_class"])
    try:
        data_class(split=split, root=str(path.parent), download=True)
    except Exception as exc:  # network errors come in many types
        raise OSError(
            f"downloading {flag!r} with medmnist failed ({type(exc).__name__}: {exc}). Are you "
            f"offline? Copy {path.name} to {path.parent} by hand and retry."
        ) from exc


def load_medmnist(path, *, split: str = "train", as_frame: bool = False, download: bool = False):
    """Load one split of a MedMNIST ``.npz`` file.

    Parameters
    ----------
    path : str or path-like
        The ``.npz`` file (keys ``train_images``, ``train_labels``, ``val_*``, ``test_*``), or a
        bare data-set name (``"breastmnist"``) looked up in :func:`shared_data_dir`.
    split : {"train", "val", "test"}, default="train"
    as_frame : bool, default=False
        Return the images as an image frame (:func:`skrtl.make_image_frame`) instead of an
        array.
    download : bool, default=False
        When the file is missing, download it with the ``medmnist`` package (needs network).

    Returns
    -------
    images : ndarray of shape (n, H, W), (n, H, W, 3) or (n, D, H, W), or image frame
        Raw ``uint8`` images.
    labels : ndarray of shape (n,)
        Labels flattened to 1-D (multi-label sets keep shape ``(n, n_labels)``).

    Examples
    --------
    >>> from skrtl.datasets import load_medmnist
    >>> X, y = load_medmnist("breastmnist.npz", split="test")  # doctest: +SKIP
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS!r}, got {split!r}.")
    p = _resolve(path)
    if not p.exists():
        if not download:
            raise FileNotFoundError(
                f"MedMNIST file {str(p)!r} not found. Pass the path of a .npz file, set "
                "SKRTL_DATA_DIR, or use download=True (needs the medmnist package and network)."
            )
        _download(p, split)
        if not p.exists():
            raise FileNotFoundError(f"medmnist did not write {str(p)!r} (size not 28?).")
    if p.is_dir():
        raise ValueError(f"{str(p)!r} is a folder; pass the path of a MedMNIST .npz file.")
    try:
        data = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(
            f"{str(p)!r} is not a MedMNIST .npz file (a zip archive of numpy arrays such as "
            f"train_images / train_labels); numpy could not read it ({type(exc).__name__}). "
            "Download one with skrtl.datasets.load_medmnist(..., download=True) or from "
            "https://medmnist.com."
        ) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{str(p)!r} holds a single array (a .npy file, shape {np.shape(data)!r}), not a "
            "MedMNIST .npz archive with train_images / train_labels / ... arrays. Save images "
            "and labels together with np.savez(path, train_images=..., train_labels=..., ...)."
        )
    with data:
        key_x, key_y = f"{split}_images", f"{split}_labels"
        if key_x not in data or key_y not in data:
            raise KeyError(
                f"{p.name} has no {key_x!r}/{key_y!r} arrays (keys: {sorted(data.files)!r}); "
                "is it a MedMNIST file?"
            )
        images = np.asarray(data[key_x])
        labels = np.asarray(data[key_y])
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels.ravel()
    if as_frame:
        return make_image_frame(images), labels
    return images, labels
