"""Lesion-centred crops, resampling and 2-D / 2.5-D views."""

from __future__ import annotations

import numpy as np
import pytest

from skrtl import (
    LesionCrop,
    MedicalImage,
    adjacent_slices,
    crop_lesion,
    lesion_slice,
    orthogonal_planes,
)

SPACING = (2.0, 0.75, 0.6)  # (z, y, x) mm


def _ramp(shape, spacing, coef=(3.0, -2.0, 0.5)):
    """A linear function of the physical position: linear / cubic interpolation is exact."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum(c * g for c, g in zip(coef, grids)).astype(np.float32)


def _ellipsoid(shape, spacing, center_vox, radius_mm):
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d2 = sum(((g - c) * s / radius_mm) ** 2 for g, c, s in zip(grids, center_vox, spacing))
    return d2 <= 1.0


@pytest.fixture
def case():
    shape = (40, 96, 110)
    vol = _ramp(shape, SPACING)
    mask = _ellipsoid(shape, SPACING, (20, 50, 60), 9.0)
    return vol, mask


def test_margin_crop_is_an_exact_sub_array(case):
    vol, mask = case
    crop = crop_lesion(vol, mask, spacing=SPACING, margin_mm=(4.0, 3.0, 3.0))
    assert isinstance(crop, LesionCrop) and not crop.resampled and not crop.was_padded
    (z0, z1), (y0, y1), (x0, x1) = crop.lesion_bbox
    assert (z0, z1) == tuple(
        int(v) for v in np.flatnonzero(mask.any(axis=(1, 2)))[[0, -1]] + [0, 1]
    )
    # 4 mm = 2 slices, 3 mm = 4 rows / 5 columns on each side
    assert crop.image.shape == (z1 - z0 + 4, y1 - y0 + 8, x1 - x0 + 10)
    s = tuple(int(v) for v in crop.start)
    np.testing.assert_array_equal(
        crop.image,
        vol[
            s[0] : s[0] + crop.image.shape[0],
            s[1] : s[1] + crop.image.shape[1],
            s[2] : s[2] + crop.image.shape[2],
        ],
    )
    assert crop.mask.sum() == mask.sum() and crop.spacing == SPACING
    default = crop_lesion(vol, mask, spacing=SPACING)  # 10 mm margin
    assert default.size_mm[0] == pytest.approx((z1 - z0) * 2.0 + 20.0)


@pytest.mark.parametrize("order", [1, 3])
def test_fixed_box_resampled_isotropic_is_geometrically_exact(case, order):
    vol, mask = case
    crop = crop_lesion(
        vol,
        mask,
        spacing=SPACING,
        size_mm=32,
        target_spacing=1.0,
        order=order,
        anti_aliasing=False,
    )
    assert crop.image.shape == (32, 32, 32) and crop.spacing == (1.0, 1.0, 1.0)
    assert crop.resampled and crop.order == order and not crop.truncated
    # expected: the ramp at the physical position of every output voxel
    src = np.asarray(crop.start)[:, None] + np.stack(
        np.meshgrid(*[np.arange(32) / s for s in SPACING], indexing="ij")
    ).reshape(3, -1)
    phys = src * np.asarray(SPACING)[:, None]
    expected = (np.array([3.0, -2.0, 0.5]) @ phys).reshape(32, 32, 32)
    np.testing.assert_allclose(crop.image, expected, atol=1e-3)
    # the mask keeps its physical volume (nearest neighbour) and its centre
    vol_mm3 = mask.sum() * np.prod(SPACING)
    assert crop.mask.sum() == pytest.approx(vol_mm3, rel=0.05)
    com = np.argwhere(crop.mask).mean(axis=0)
    np.testing.assert_allclose(com, [15.5, 15.5, 15.5], atol=0.6)


def test_in_plane_only_keeps_slices(case):
    vol, mask = case
    crop = crop_lesion(
        vol, mask, spacing=SPACING, size_mm=(20, 30, 30), target_spacing=(None, 1, 1)
    )
    assert crop.spacing == (2.0, 1.0, 1.0) and crop.image.shape == (10, 30, 30)
    z0 = int(crop.start[0])
    assert crop.start[0] == z0  # no interpolation across slices
    np.testing.assert_allclose(
        crop.image[:, 0, 0] - crop.image[0, 0, 0],
        vol[z0 : z0 + 10, 0, 0] - vol[z0, 0, 0],
        atol=1e-3,
    )


def test_downsampling_anti_aliasing_smooths_noise():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(30, 60, 60)).astype(np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[10:20, 20:40, 20:40] = True
    kw = {"spacing": 0.5, "size_mm": 10, "target_spacing": 2.0}
    smooth = crop_lesion(vol, mask, **kw)
    raw = crop_lesion(vol, mask, anti_aliasing=False, **kw)
    assert smooth.image.std() < 0.6 * raw.image.std()


def test_padding_outside_the_volume_is_recorded(case):
    vol, _ = case
    corner = np.zeros(vol.shape, bool)
    corner[0:2, 0:4, -4:] = True
    crop = crop_lesion(vol, corner, spacing=SPACING, size_mm=30, target_spacing=1.0)
    assert crop.was_padded and crop.pad_value == pytest.approx(vol.min())
    (zb, za), (yb, ya), (xb, xa) = crop.padded
    assert zb > 0 and yb > 0 and xa > 0 and za == ya == xb == 0
    assert np.all(crop.image[:zb] == crop.pad_value)
    assert np.all(crop.image[:, :, crop.image.shape[2] - xa :] == crop.pad_value)
    assert not crop.mask[:zb].any() and crop.mask.any()
    zero = crop_lesion(vol, corner, spacing=SPACING, margin_mm=5, pad_value=0.0)
    assert zero.was_padded and zero.pad_value == 0.0 and not zero.resampled
    assert np.all(zero.image[: zero.padded[0][0]] == 0.0)
    record = crop.to_dict()
    assert record["padded"] == [list(p) for p in crop.padded] and record["resampled"]


def test_truncation_warns(case):
    vol, mask = case
    with pytest.warns(UserWarning, match="extends beyond the 10 x 10 x 10 mm box"):
        crop = crop_lesion(vol, mask, spacing=SPACING, size_mm=10)
    assert crop.truncated


def test_medical_image_input_keeps_geometry(case):
    vol, mask = case
    img = MedicalImage.from_array(vol, spacing=SPACING, origin=(-50.0, 10.0, 20.0))
    crop = crop_lesion(img, mask, size_mm=24, target_spacing=1.5)
    out = crop.to_medical_image()
    assert out.spacing == (1.5, 1.5, 1.5) and out.layout == "zyx"
    np.testing.assert_allclose(out.index_to_physical([0, 0, 0]), img.index_to_physical(crop.start))
    np.testing.assert_allclose(
        out.index_to_physical([3, 4, 5]),
        img.index_to_physical(
            np.asarray(crop.start) + np.array([3, 4, 5]) * 1.5 / np.array(SPACING)
        ),
    )


def test_tiny_lesion_survives_downsampling():
    vol = np.zeros((20, 40, 40), np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[10, 20, 21] = True  # one 0.5 mm voxel
    crop = crop_lesion(vol, mask, spacing=0.5, size_mm=8, target_spacing=2.0)
    assert crop.mask.sum() == 1


def test_2d_images_with_channels():
    img = np.random.default_rng(1).random((50, 60, 3)).astype(np.float32)
    mask = np.zeros((50, 60), bool)
    mask[20:30, 25:35] = True
    crop = crop_lesion(img, mask, spacing=(0.5, 0.5), size_mm=10, target_spacing=0.25)
    assert crop.image.shape == (40, 40, 3) and crop.mask.shape == (40, 40)
    plain = crop_lesion(img, mask, spacing=1.0, margin_mm=2)
    np.testing.assert_array_equal(plain.image, img[18:32, 23:37])


def test_crop_errors(case):
    vol, mask = case
    with pytest.raises(ValueError, match="needs spacing"):
        crop_lesion(vol, mask)
    with pytest.raises(ValueError, match="either margin_mm .* or size_mm"):
        crop_lesion(vol, mask, spacing=1, margin_mm=2, size_mm=10)
    with pytest.raises(ValueError, match="mask is empty"):
        crop_lesion(vol, np.zeros_like(mask), spacing=1)
    with pytest.raises(ValueError, match="does not match the image"):
        crop_lesion(vol, mask[:, :10], spacing=1)
    with pytest.raises(ValueError, match="without a mask, crop_lesion needs size_mm"):
        crop_lesion(vol, None, spacing=1)
    with pytest.raises(ValueError, match="one value per spatial axis"):
        crop_lesion(vol, mask, spacing=(1, 1))
    with pytest.raises(ValueError, match="target_spacing must be > 0"):
        crop_lesion(vol, mask, spacing=1, target_spacing=0)
    centred = crop_lesion(vol, None, spacing=SPACING, size_mm=20)
    assert centred.mask is None and centred.center == pytest.approx(((40 - 1) / 2, 47.5, 54.5))


def test_lesion_slice_largest_and_center():
    vol = np.arange(10)[:, None, None] * np.ones((10, 8, 8), np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[2, 1:7, 1:7] = True  # the largest cross-section (36 px)
    mask[3:9, 3:5, 3:5] = True  # a long thin tail moves the centre of mass up
    img, m, z = lesion_slice(vol, mask)
    assert z == 2 and m.sum() == 36 and np.all(img == 2)
    _, _, zc = lesion_slice(vol, mask, method="center")
    assert zc == int(np.round(np.argwhere(mask)[:, 0].mean())) and zc != 2
    assert lesion_slice(vol)[2] == 5
    with pytest.raises(ValueError, match="method must be"):
        lesion_slice(vol, mask, method="biggest")
    with pytest.raises(ValueError, match=r"needs a \(z, y, x\) volume"):
        lesion_slice(vol[0], mask[0])


def test_adjacent_slices_and_edges():
    vol = np.arange(6)[:, None, None] * np.ones((6, 4, 5), np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[4, 1:3, 1:3] = True
    img, m, idx = adjacent_slices(vol, mask, n_slices=3)
    assert img.shape == (4, 5, 3) and list(idx) == [3, 4, 5]
    np.testing.assert_array_equal(img[0, 0], [3, 4, 5])
    assert m.sum() == 4
    _, _, idx = adjacent_slices(vol, mask, n_slices=5, step=2)
    assert list(idx) == [0, 2, 4, 5, 5]  # clipped at the end of the volume
    with pytest.raises(ValueError, match="n_slices and step"):
        adjacent_slices(vol, mask, n_slices=0)


def test_orthogonal_planes():
    rng = np.random.default_rng(2)
    vol = rng.random((16, 16, 16)).astype(np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[5:8, 9:12, 2:5] = True
    planes, mplanes, (cz, cy, cx) = orthogonal_planes(vol, mask)
    assert (cz, cy, cx) == (6, 10, 3)
    np.testing.assert_array_equal(planes[0], vol[6])
    np.testing.assert_array_equal(planes[1], vol[:, 10])
    np.testing.assert_array_equal(planes[2], vol[:, :, 3])
    assert all(mp.sum() == 9 for mp in mplanes)
    stacked, union, _ = orthogonal_planes(vol, mask, stack=True)
    assert stacked.shape == (16, 16, 3) and union.dtype == bool
    with pytest.raises(ValueError, match="stack=True needs a cube"):
        orthogonal_planes(vol[:8], mask[:8], stack=True)
    with pytest.raises(ValueError, match="center must be a voxel index"):
        orthogonal_planes(vol, mask, center=(20, 0, 0))


def test_crop_then_views_pipeline(case):
    vol, mask = case
    crop = crop_lesion(vol, mask, spacing=SPACING, size_mm=32, target_spacing=1.0)
    planes, pmask, centre = orthogonal_planes(crop.image, crop.mask, stack=True)
    assert planes.shape == (32, 32, 3) and pmask.any()
    img2d, m2d, z = lesion_slice(crop.image, crop.mask)
    assert img2d.shape == (32, 32) and m2d.sum() == crop.mask.sum(axis=(1, 2)).max()
