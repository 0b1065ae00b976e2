"""Scanner-shift suite: every shift, five monotone severities, containers, units, determinism."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skrtl import make_image_frame
from skrtl.datasets import (
    ScannerProfile,
    list_scanner_shifts,
    make_lesion_phantom,
    plot_scanner_shifts,
    simulate_scanner,
)

ROOT = Path(__file__).resolve().parents[1]
TABLE = list_scanner_shifts()
SHIFTS = TABLE.loc[TABLE["type"] == "shift", "name"].tolist()
SHIFTS_2D = TABLE.loc[(TABLE["type"] == "shift") & ~TABLE["volumes_only"], "name"].tolist()
PROFILES = TABLE.loc[TABLE["type"] == "profile", "name"].tolist()
CT_SHIFTS = [
    n
    for n, m in zip(TABLE["name"], TABLE["modality"])
    if n in SHIFTS and (m == "any" or "ct" in m.split(", "))
]


@pytest.fixture(scope="module")
def uint8_images():
    """Eight 48-px phantom images as uint8 (a stand-in for MedMNIST / ultrasound data)."""
    data = make_lesion_phantom(8, image_size=48, n_sites=1, random_state=0)
    imgs = np.stack(data.frame["image"].to_numpy())
    lo, hi = np.percentile(imgs, [1, 99])
    return (np.clip((imgs - lo) / (hi - lo), 0, 1) * 220 + 10).astype(np.uint8)


@pytest.fixture(scope="module")
def ct_slices():
    """Four synthetic CT slices in HU: air, body (soft tissue 40 HU, fat -100), lung, bone."""
    rng = np.random.default_rng(1)
    h = 64
    yy, xx = np.mgrid[:h, :h] - (h - 1) / 2
    out = []
    for _ in range(4):
        img = np.full((h, h), -1000.0)
        body = (yy / 28) ** 2 + (xx / 24) ** 2 < 1
        img[body] = 40
        img[body & ((yy / 27) ** 2 + (xx / 23) ** 2 > 0.85)] = -100
        img[((yy + 4) / 12) ** 2 + ((xx - 10) / 7) ** 2 < 1] = -850
        img[((yy - 14) / 4) ** 2 + (xx / 6) ** 2 < 1] = 700
        img += rng.normal(0, 5, img.shape)
        out.append(img)
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def volumes():
    data = make_lesion_phantom(4, ndim=3, image_size=24, n_sites=1, random_state=0)
    return np.stack(data.frame["image"].to_numpy()).astype(np.float32)


def _psnr(a, b, peak):
    mse = float(np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2))
    return np.inf if mse == 0 else 10 * np.log10(peak**2 / mse)


@pytest.mark.parametrize("kind", SHIFTS_2D)
def test_psnr_decreases_with_severity_uint8(kind, uint8_images):
    out = [simulate_scanner(uint8_images, kind, s, random_state=0) for s in range(1, 6)]
    for o in out:
        assert o.dtype == np.uint8 and o.shape == uint8_images.shape
    psnr = [_psnr(o, uint8_images, 255.0) for o in out]
    assert np.all(np.isfinite(psnr)), psnr  # severity 1 already changes the images
    assert np.all(np.diff(psnr) < 0), f"{kind}: PSNR {np.round(psnr, 2)} not decreasing"


@pytest.mark.parametrize("kind", SHIFTS_2D)
def test_ssim_decreases_with_severity(kind, uint8_images):
    metrics = pytest.importorskip("skimage.metrics")
    ssim = []
    for s in range(1, 6):
        out = simulate_scanner(uint8_images, kind, s, random_state=0)
        ssim.append(
            np.mean(
                [
                    metrics.structural_similarity(a, b, data_range=255)
                    for a, b in zip(uint8_images, out)
                ]
            )
        )
    assert ssim[0] < 1.0
    assert ssim[-1] < ssim[0], f"{kind}: SSIM {np.round(ssim, 3)}"
    # allow ties from rounding to uint8, never a clear rise
    assert np.all(np.diff(ssim) < 2e-3), f"{kind}: SSIM {np.round(ssim, 3)} rises"


@pytest.mark.parametrize("kind", [k for k in CT_SHIFTS if k != "thick_slices"])
def test_ct_shifts_stay_in_hounsfield_units(kind, ct_slices):
    out = [simulate_scanner(ct_slices, kind, s, modality="ct", random_state=0) for s in (1, 3, 5)]
    for o in out:
        assert o.dtype == np.float32
        assert o.min() >= -1024 and o.max() <= 3071
    psnr = [_psnr(o, ct_slices, 4095.0) for o in out]
    assert np.all(np.diff(psnr) < 0), f"{kind}: PSNR {np.round(psnr, 2)}"
    if kind != "window":  # a window clips air and bone by design
        # amounts are in HU: severity 1 changes the slices by well under 100 HU on average
        assert np.mean(np.abs(out[0] - ct_slices)) < 100


def test_ct_noise_sd_is_in_hu(ct_slices):
    out = simulate_scanner(ct_slices, "gaussian_noise", 3, modality="ct", random_state=0)
    body = ct_slices > -500
    assert np.std((out - ct_slices)[body]) == pytest.approx(25.0, rel=0.1)
    window = simulate_scanner(ct_slices, "window", 5, modality="ct", random_state=0)
    assert window.min() >= 40 - 125 - 1e-3 and window.max() <= 40 + 125 + 1e-3


@pytest.mark.parametrize("kind", SHIFTS)
def test_volume_shifts_monotone(kind, volumes):
    peak = float(np.ptp(volumes))
    psnr = [
        _psnr(simulate_scanner(volumes, kind, s, random_state=0), volumes, peak)
        for s in range(1, 6)
    ]
    assert np.all(np.diff(psnr) < 0), f"{kind}: PSNR {np.round(psnr, 2)}"


def test_thick_slices_blur_only_along_depth(volumes):
    out = simulate_scanner(volumes, "thick_slices", 4, random_state=0)
    # averaging along depth keeps every depth-column mean (up to the edge slabs)
    np.testing.assert_allclose(out.mean(axis=1)[:, 4:-4], volumes.mean(axis=1)[:, 4:-4], atol=0.2)
    with pytest.raises(ValueError, match="needs volumes"):
        simulate_scanner(volumes[:, 0], "thick_slices", 2)


def test_severity_zero_and_bad_severity(uint8_images):
    np.testing.assert_array_equal(simulate_scanner(uint8_images, "blur", 0), uint8_images)
    for bad in (6, -1, 2.5, True):
        with pytest.raises(ValueError, match="severity"):
            simulate_scanner(uint8_images, "blur", bad)


def test_unknown_kind_and_modality_errors(uint8_images):
    with pytest.raises(ValueError, match="not a scanner shift or profile.*speckle"):
        simulate_scanner(uint8_images, "speckel")
    with pytest.raises(ValueError, match="modality='us'.*modality=None"):
        simulate_scanner(uint8_images, "ring", modality="us")
    with pytest.raises(ValueError, match="modality='pet'"):
        simulate_scanner(uint8_images, "blur", modality="pet")
    with pytest.raises(TypeError, match="kind must be"):
        simulate_scanner(uint8_images, 3)


def test_deterministic_local_rng(uint8_images):
    state = np.random.get_state()  # noqa: NPY002
    a = simulate_scanner(uint8_images, "speckle", 3, random_state=7)
    b = simulate_scanner(uint8_images, "speckle", 3, random_state=7)
    c = simulate_scanner(uint8_images, "speckle", 3, random_state=8)
    after = np.random.get_state()  # noqa: NPY002
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert state[0] == after[0] and np.array_equal(state[1], after[1])  # global RNG untouched
    # image i depends on (random_state, i) only, not on the images after it
    np.testing.assert_array_equal(
        simulate_scanner(uint8_images[:3], "speckle", 3, random_state=7), a[:3]
    )
    g = np.random.default_rng(3)
    assert simulate_scanner(uint8_images, "ring", 2, random_state=g).shape == uint8_images.shape


def test_containers_frame_list_colour(uint8_images):
    masks = uint8_images > 128
    frame = make_image_frame(
        [uint8_images[0], uint8_images[1][:40, :30]],
        masks=[masks[0], masks[1][:40, :30]],
        sites=["A", "B"],
        age=[50, 60],
    )
    out = simulate_scanner(frame, "streak", 3, random_state=0)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == list(frame.columns)
    assert [im.shape for im in out["image"]] == [(48, 48), (40, 30)]
    assert out["image"].iloc[0].dtype == np.uint8
    assert out["site"].tolist() == ["A", "B"] and out["age"].tolist() == [50, 60]
    assert out["mask"].iloc[1] is frame["mask"].iloc[1]
    assert not np.array_equal(out["image"].iloc[0], frame["image"].iloc[0])
    lst = simulate_scanner([uint8_images[0], uint8_images[1]], "blur", 2)
    assert isinstance(lst, list) and lst[0].shape == (48, 48)
    colour = np.repeat(uint8_images[:2, :, :, None], 3, axis=3)
    out_c = simulate_scanner(colour, "gamma", 3)
    assert out_c.shape == colour.shape and out_c.dtype == np.uint8
    # a grey image stays grey under an intensity look-up table
    np.testing.assert_array_equal(out_c[..., 0], out_c[..., 2])


def test_value_range_and_float_images(uint8_images):
    f = uint8_images.astype(np.float64) / 255.0
    out = simulate_scanner(f, "brightness", 5, value_range=(0.0, 1.0))
    assert out.dtype == np.float64 and out.max() <= 1.0
    out_own = simulate_scanner(f * 1000 + 5, "gaussian_noise", 3, random_state=0)
    rel = np.std(out_own - (f * 1000 + 5)) / np.ptp(f * 1000)
    assert rel == pytest.approx(0.05, rel=0.15)  # amounts relative to the image's own range
    with pytest.raises(ValueError, match="value_range"):
        simulate_scanner(f, "blur", value_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="NaN"):
        simulate_scanner(np.full((1, 8, 8), np.nan), "blur")


def test_mask_anchors_streaks():
    img = np.full((1, 48, 48), 100, dtype=np.uint8)
    mask = np.zeros((1, 48, 48), dtype=bool)
    mask[0, 8, 9] = True
    diff = np.abs(
        simulate_scanner(img, "streak", 5, masks=mask, random_state=0).astype(float) - 100
    )
    yy, xx = np.mgrid[:48, :48]
    cy, cx = (diff[0] * yy).sum() / diff.sum(), (diff[0] * xx).sum() / diff.sum()
    assert np.hypot(cy - 8, cx - 9) < np.hypot(cy - 23.5, cx - 23.5)


def test_mr_noise_is_rician():
    img = np.zeros((2, 32, 32), dtype=np.float32)
    img[:, 8:24, 8:24] = 1.0
    out = simulate_scanner(img, "gaussian_noise", 4, modality="mr", random_state=0)
    assert out[:, :4, :4].min() >= 0  # magnitude images: background noise is positive
    assert out[:, :4, :4].mean() > 0.02


def test_profiles_and_lists(uint8_images):
    prof = ScannerProfile([("blur", 2), "gaussian_noise"], name="p")
    assert prof.resolve(4) == (("blur", 2), ("gaussian_noise", 4))
    a = simulate_scanner(uint8_images, prof, 4, random_state=0)
    b = simulate_scanner(uint8_images, [("blur", 2), "gaussian_noise"], 4, random_state=0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, simulate_scanner(uint8_images, "blur", 2, random_state=0))
    for name in PROFILES:
        vol = False
        modality = TABLE.set_index("name").loc[name, "modality"]
        out = simulate_scanner(uint8_images, name, 2, random_state=0)
        assert out.shape == uint8_images.shape and not vol
        if modality != "any":
            # the profile's own modality is the default and is checked
            with pytest.raises(ValueError, match="realistic"):
                simulate_scanner(uint8_images, name, modality="ct" if modality != "ct" else "us")
    with pytest.raises(ValueError, match="not a scanner shift"):
        ScannerProfile(["blur", "nope"])
    with pytest.raises(ValueError, match="at least one"):
        ScannerProfile([])


def test_list_scanner_shifts_table():
    assert {"name", "type", "modality", "parameter", "severities", "description"} <= set(
        TABLE.columns
    )
    shifts = TABLE[TABLE["type"] == "shift"]
    assert all(len(s) == 5 for s in shifts["severities"])
    for required in ("blur", "sharpen", "gaussian_noise", "poisson_noise", "gamma", "contrast"):
        assert required in SHIFTS
    for required in ("brightness", "window", "downsample", "thick_slices", "ring", "streak"):
        assert required in SHIFTS
    assert {"speckle", "bias_field"} <= set(SHIFTS)


def test_docs_list_every_shift_and_profile():
    page = (ROOT / "docs" / "scanner_shifts.md").read_text()
    missing = [n for n in TABLE["name"] if not re.search(rf"`{n}`", page)]
    assert not missing, f"docs/scanner_shifts.md does not describe {missing}"
    assert (ROOT / "docs" / "img" / "scanner_shifts.png").is_file()


def test_plot_scanner_shifts(uint8_images):
    fig = plot_scanner_shifts(uint8_images[0], ["blur", "ring"], severities=(1, 5))
    assert len(fig.axes) == 2 * 3
    assert fig.axes[1].get_title().startswith("s1")
    fig_all = plot_scanner_shifts(uint8_images[0], modality="us")
    assert len(fig_all.axes) // 6 == len(
        [n for n in SHIFTS_2D if TABLE.set_index("name").loc[n, "modality"] in ("any",)]
        + [n for n in SHIFTS_2D if "us" in TABLE.set_index("name").loc[n, "modality"].split(", ")]
    )
    with pytest.raises(ValueError, match="one 2-D image"):
        plot_scanner_shifts(uint8_images[None])
    vol_fig = plot_scanner_shifts(uint8_images[:4], ["thick_slices"], severities=(2,))
    assert len(vol_fig.axes) == 2
