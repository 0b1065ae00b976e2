"""Lesion phantom and MedMNIST loaders."""

from __future__ import annotations

import time

import numpy as np
import pytest

from skrtl._imaging import read_image_frame
from skrtl.datasets import (
    default_site_params,
    load_medmnist,
    make_lesion_phantom,
    power_law_field,
    shared_data_dir,
)


def _slope(img: np.ndarray) -> float:
    """Log-log slope of the radially averaged power spectrum of a 2-D patch."""
    n = img.shape[0]
    w = np.hanning(n)
    p = np.abs(np.fft.fft2((img - img.mean()) * np.outer(w, w))) ** 2
    f = np.sqrt(np.add.outer(np.fft.fftfreq(n) ** 2, np.fft.fftfreq(n) ** 2))
    sel = (f > 2.0 / n) & (f < 0.4)
    return float(np.polyfit(np.log(f[sel]), np.log(p[sel]), 1)[0])


def test_phantom_shapes_and_frame():
    data = make_lesion_phantom(30, image_size=32, random_state=0)
    assert data.frame.shape == (30, 4)
    assert list(data.frame.columns) == ["image", "mask", "spacing", "site"]
    inp = read_image_frame(data.frame, require_masks=True)
    assert inp.images[0].shape == (32, 32) and inp.images[0].dtype == np.float32
    assert inp.spacing.shape == (30, 2)
    assert set(data.sites) == {"A", "B", "C"}
    assert data.target.shape == data.risk.shape == (30,)
    assert data.survival.dtype.names == ("event", "time")
    assert (data.survival["time"] > 0).all()
    assert set(data.site_params) == {"A", "B", "C"}
    # spacing follows the site
    for site, params in data.site_params.items():
        sp = np.stack(data.frame.spacing[data.sites == site].to_list())
        assert np.allclose(sp, params["spacing"])


def test_phantom_deterministic():
    a = make_lesion_phantom(12, image_size=24, random_state=3)
    b = make_lesion_phantom(12, image_size=24, random_state=3)
    c = make_lesion_phantom(12, image_size=24, random_state=4)
    assert np.array_equal(np.stack(a.frame.image), np.stack(b.frame.image))
    assert np.array_equal(a.survival, b.survival)
    assert not np.array_equal(np.stack(a.frame.image), np.stack(c.frame.image))


def test_phantom_prevalence_per_site():
    data = make_lesion_phantom(900, image_size=16, prevalence=[0.1, 0.5, 0.9], random_state=0)
    for site, prev in zip("ABC", [0.1, 0.5, 0.9]):
        assert abs(data.target[data.sites == site].mean() - prev) < 0.08
    assert data.prevalence == {"A": 0.1, "B": 0.5, "C": 0.9}


def test_power_law_field_slope():
    for alpha in (2.0, 3.5):
        fields = power_law_field((64, 64), alpha, n=8, random_state=0)
        assert fields.shape == (8, 64, 64)
        assert np.allclose(fields.mean(axis=(1, 2)), 0, atol=1e-4)
        assert np.allclose(fields.std(axis=(1, 2)), 1, atol=1e-3)
        slope = np.mean([_slope(f) for f in fields])
        assert abs(slope + alpha) < 0.35, (alpha, slope)


def test_phantom_alpha_difference_measurable():
    sites = [{"blur_sigma": 0.0, "noise_sd": 0.0, "spacing": 1.0}]
    data = make_lesion_phantom(
        120, image_size=64, n_sites=1, site_params=sites, prevalence=0.5,
        margin_irregularity=0.0, lesion_radius_mm=40.0, random_state=0,
    )  # fmt: skip
    slopes = []
    for img, m in zip(data.frame.image, data.frame["mask"]):
        cy, cx = (int(round(v)) for v in np.argwhere(m).mean(axis=0))
        slopes.append(_slope(img[cy - 12 : cy + 12, cx - 12 : cx + 12]))
    slopes = np.asarray(slopes)
    benign, malignant = slopes[data.target == 0].mean(), slopes[data.target == 1].mean()
    assert malignant - benign > 0.4, (benign, malignant)  # rougher texture: flatter spectrum


def test_phantom_sites_differ_and_risk_links_survival():
    from skrtl._survival import concordance_index

    data = make_lesion_phantom(300, image_size=32, random_state=0)
    means = {s: np.mean([im.mean() for im in data.frame.image[data.sites == s]]) for s in "ABC"}
    assert means["B"] - means["C"] > 0.2  # intensity offsets of the simulated scanners
    assert concordance_index(data.survival, data.risk) > 0.65
    assert 0.15 < 1 - data.survival["event"].mean() < 0.5


def test_phantom_3d():
    data = make_lesion_phantom(6, ndim=3, image_size=16, random_state=0)
    inp = read_image_frame(data.frame, mode="3d", require_masks=True)
    assert inp.images[0].shape == (16, 16, 16)
    assert inp.spacing.shape == (6, 3)


def test_phantom_speed():
    start = time.perf_counter()
    make_lesion_phantom(300, image_size=64, random_state=0)
    assert time.perf_counter() - start < 5.0  # < 2 s unloaded; generous on a shared CPU


def test_phantom_errors():
    with pytest.raises(ValueError, match="ndim"):
        make_lesion_phantom(10, ndim=4)
    with pytest.raises(ValueError, match="prevalence"):
        make_lesion_phantom(10, prevalence=[0.1, 0.2])
    with pytest.raises(ValueError, match="unknown keys"):
        make_lesion_phantom(10, n_sites=1, site_params=[{"blurr": 1.0}])
    with pytest.raises(ValueError, match="image_size"):
        make_lesion_phantom(10, image_size=8)
    assert len(default_site_params(5)) == 5


def _write_npz(path, n=6):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in (("train", n), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (k, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (k, 1))
    np.savez(path, **arrays)
    return arrays


def test_load_medmnist(tmp_path):
    path = tmp_path / "tinymnist.npz"
    arrays = _write_npz(path)
    X, y = load_medmnist(path)
    assert X.shape == (6, 28, 28) and y.shape == (6,)
    assert np.array_equal(y, arrays["train_labels"].ravel())
    X, y = load_medmnist(str(path), split="test")
    assert X.shape == (3, 28, 28)
    frame, y = load_medmnist(path, split="val", as_frame=True)
    assert list(frame.columns) == ["image"] and len(frame) == 2


def test_load_medmnist_errors(tmp_path, monkeypatch):
    path = tmp_path / "tinymnist.npz"
    _write_npz(path)
    with pytest.raises(ValueError, match="split"):
        load_medmnist(path, split="training")
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_medmnist(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(KeyError, match="train_images"):
        load_medmnist(tmp_path / "other.npz")
    import sys

    monkeypatch.setitem(sys.modules, "medmnist", None)  # simulate a missing package
    with pytest.raises(ImportError, match="medmnist"):
        load_medmnist(tmp_path / "breastmnist.npz", download=True)


def test_shared_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SKRTL_DATA_DIR", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.setenv("SKRTL_DATA_DIR", str(tmp_path / "nope"))
    assert shared_data_dir() is None


def test_load_real_breastmnist():
    monkey_dir = shared_data_dir()
    if monkey_dir is None or not (monkey_dir / "breastmnist.npz").is_file():
        pytest.skip("shared data not available")
    X, y = load_medmnist(monkey_dir / "breastmnist.npz", split="test")
    assert X.shape == (156, 28, 28) and set(np.unique(y)) == {0, 1}
