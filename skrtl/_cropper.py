"""Lesion-centred crops as a Pipeline step: :class:`LesionCropper`.

A cohort of CT / MR volumes (:func:`skrtl.read_cohort`) holds 512 x 512 x 100-300 voxels per
case, the lesion a few centimetres of them. :class:`LesionCropper` is the first step of a
pipeline on such a cohort: it loads one case at a time, crops the box around its mask
(:func:`skrtl.crop_lesion`: bounding box plus a margin in mm, or a fixed field of view in mm),
optionally resamples the box to a target spacing, optionally takes one axial slice
(:func:`skrtl.lesion_slice`), and returns an **in-memory image frame of the crops**, which the
CNN estimators, the radiomics features and the image harmonizers take as any other frame::

    Pipeline([
        ("crop", LesionCropper(size_mm=64, target_spacing=1.0)),  # 64 mm cube at 1 mm
        ("cnn", PretrainedCNNFeatures(mode="2.5d", passthrough=["site"])),
        ("combat", ComBatHarmonizer()),
        ("clf", LogisticRegression()),
    ]).set_output(transform="pandas")

The views of the issue's 2-D / 2.5-D / 3-D models:

* 2-D: ``LesionCropper(mode="2d")`` (the slice with the largest lesion area, or
  ``slice_method="center"``), then ``mode="2d"`` estimators;
* 2.5-D: ``LesionCropper(size_mm=s, target_spacing=t)`` (a cube), then ``mode="2.5d"``
  estimators (three orthogonal planes or adjacent slices through the lesion centre);
* 3-D: the whole crop, then ``mode="3d"`` estimators (slice-wise).
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._base import ImageEstimatorMixin
from ._imaging import MAX_CHANNELS, first_case_layout, make_image_frame, read_image_frame
from ._lesion import crop_lesion, lesion_slice

__all__ = ["LesionCropper"]

#: columns of the input that say how a case is read; applied by the crop, so dropped
_READ_COLUMNS = ("image", "mask", "mask_label", "series_uid", "spacing")


def _volume_mode(X) -> str:
    """``"3d"`` when the cases are volumes, ``"2d"`` for 2-D images."""
    layout = first_case_layout(X)
    if layout is not None:
        return "3d" if layout == "zyx" else "2d"
    if isinstance(X, pd.DataFrame) and "image" in X.columns and len(X):
        img = np.asarray(X["image"].iloc[0])
        if img.ndim != 3:
            return "2d"
        if "mask" in X.columns and isinstance(X["mask"].iloc[0], np.ndarray):
            return "3d" if np.asarray(X["mask"].iloc[0]).ndim == 3 else "2d"
        if "spacing" in X.columns and len(tuple(X["spacing"].iloc[0])) == 3:
            return "3d"
        return "3d" if img.shape[-1] > MAX_CHANNELS else "2d"
    arr = np.asarray(X) if not isinstance(X, np.ndarray) else X
    return "3d" if arr.ndim == 4 else "2d"


class LesionCropper(ImageEstimatorMixin, TransformerMixin, BaseEstimator):
    """Crop every case to its lesion (and optionally one slice): the first step on a cohort.

    Loads each case (file frames from :func:`skrtl.read_cohort` one at a time, through
    :func:`skrtl.load_case`: label selected, mask geometry checked), crops it with
    :func:`skrtl.crop_lesion` and returns an in-memory image frame of the crops: ``image``
    (float32; ``uint8`` when the source images were ``uint8``, so that the ``"auto"``
    intensity rule of the CNN estimators still divides by 255), ``mask`` (bool), ``spacing``
    (of the crop), then every other column of the input (site, clinical covariates), same
    index. The ``mask_label`` and ``series_uid`` columns are dropped (they were applied).

    Parameters
    ----------
    margin_mm : float, sequence of float or None, default=None
        Margin around the mask's bounding box, in mm (per axis or one value); ``10`` when
        neither ``margin_mm`` nor ``size_mm`` is given.
    size_mm : float, sequence of float or None, default=None
        A fixed field of view centred on the lesion instead (the same physical scale for
        every case; a lesion larger than the box is cut, with a warning naming the case).
        Cases without a mask are centre-cropped to this size (without ``size_mm`` they raise).
    target_spacing : float, sequence of float (None entries keep an axis) or None
        Resample the crop to this spacing in mm (``1.0``: isotropic; ``(None, 0.8, 0.8)``:
        in-plane only). ``None``: no interpolation.
    mode : {"3d", "2d"}, default="3d"
        ``"3d"``: the whole crop (2-D images give 2-D crops). ``"2d"``: one axial slice of the
        crop of a volume, chosen by ``slice_method`` (2-D images are cropped only).
    slice_method : {"largest", "center"}, default="largest"
        ``mode="2d"``: the slice with the largest lesion area, or the slice through the
        lesion's centre of mass (:func:`skrtl.lesion_slice`).
    label : int, sequence of int or None, default=None
        Structure of multi-label masks, for rows without a ``mask_label`` value (see
        :func:`skrtl.select_label`).
    order : int, default=1
        Interpolation order of the image (1 linear, 3 cubic B-spline); masks use nearest
        neighbour.
    pad_value : "min" or float, default="min"
        Value where the box leaves the volume (the image minimum: air in CT).
    verbose : int, default=0
        ``> 0``: a progress bar.

    Attributes
    ----------
    mode_ : {"2d", "3d"}
        Whether the input cases are 2-D images or volumes.
    n_features_in_ : int
        Number of input columns.
    feature_names_in_ : ndarray of str
        Input columns (frame input).

    Notes
    -----
    The crop is per case and learns nothing: ``fit`` checks the parameters and reads the
    file headers only. Arrays without spacing are cropped in voxel units (mm taken as
    pixels), with a warning. A case that cannot be loaded or cropped raises an error naming
    it; to go on past bad cases in a batch, use ``skrtl extract`` (which records them in an
    errors file) or drop them with ``read_cohort(..., validate="full", errors="drop")``.

    Examples
    --------
    >>> import numpy as np
    >>> from skrtl import LesionCropper, make_image_frame
    >>> vol = np.zeros((40, 100, 100), np.float32)
    >>> mask = np.zeros(vol.shape, bool)
    >>> mask[18:22, 45:55, 40:60] = True
    >>> X = make_image_frame([vol], masks=[mask], spacing=(2.5, 0.7, 0.7))
    >>> crops = LesionCropper(size_mm=32, target_spacing=1.0).fit_transform(X)
    >>> crops["image"].iloc[0].shape, crops["spacing"].iloc[0]
    ((32, 32, 32), (1.0, 1.0, 1.0))
    >>> LesionCropper(mode="2d", margin_mm=5).fit_transform(X)["image"].iloc[0].shape
    (24, 34)
    """

    _parameter_constraints: dict = {
        "margin_mm": [Interval(Real, 0, None, closed="left"), tuple, list, None],
        "size_mm": [Interval(Real, 0, None, closed="neither"), tuple, list, None],
        "target_spacing": [Interval(Real, 0, None, closed="neither"), tuple, list, None],
        "mode": [StrOptions({"3d", "2d"})],
        "slice_method": [StrOptions({"largest", "center"})],
        "label": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "order": [Interval(Integral, 0, 5, closed="both")],
        "pad_value": [StrOptions({"min"}), Real],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        *,
        margin_mm=None,
        size_mm=None,
        target_spacing=None,
        mode="3d",
        slice_method="largest",
        label=None,
        order=1,
        pad_value="min",
        verbose=0,
    ):
        self.margin_mm = margin_mm
        self.size_mm = size_mm
        self.target_spacing = target_spacing
        self.mode = mode
        self.slice_method = slice_method
        self.label = label
        self.order = order
        self.pad_value = pad_value
        self.verbose = verbose

    # ------------------------------------------------------------------ helpers
    def _read(self, X, mode: str):
        return read_image_frame(X, mode=mode, label=self.label, estimator_name="LesionCropper")

    def _check_params(self, ndim: int) -> None:
        """Run the crop once on a dummy case, so that bad parameters fail in ``fit``."""
        if self.margin_mm is not None and self.size_mm is not None:
            raise ValueError(
                f"LesionCropper: give margin_mm (bounding box + margin) or size_mm (a fixed "
                f"field of view), not both; got margin_mm={self.margin_mm!r}, "
                f"size_mm={self.size_mm!r}."
            )
        shape = (8,) * ndim
        mask = np.zeros(shape, bool)
        mask[(slice(3, 5),) * ndim] = True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                crop_lesion(
                    np.zeros(shape, np.float32),
                    mask,
                    spacing=1.0,
                    margin_mm=self.margin_mm,
                    size_mm=self.size_mm,
                    target_spacing=self.target_spacing,
                    order=self.order,
                    pad_value=self.pad_value,
                )
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"LesionCropper parameters do not fit {ndim}-D cases: {exc} (margin_mm, "
                "size_mm and target_spacing take one value or one per spatial axis)."
            ) from exc

    def _output_columns(self, X) -> list[str]:
        if not isinstance(X, pd.DataFrame):
            return ["image", "spacing"]
        has_mask = "mask" in X.columns
        rest = [str(c) for c in X.columns if c not in _READ_COLUMNS]
        return ["image"] + (["mask"] if has_mask else []) + ["spacing"] + rest

    # ------------------------------------------------------------------ sklearn API
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Check the parameters and the input (headers only for file frames).

        Parameters
        ----------
        X : image frame, file frame or ndarray
        y : ignored

        Returns
        -------
        self
        """
        self.mode_ = _volume_mode(X)
        self._check_params(3 if self.mode_ == "3d" else 2)
        self._read(X, self.mode_)
        if isinstance(X, pd.DataFrame):
            self.feature_names_in_ = np.asarray([str(c) for c in X.columns], dtype=object)
            self.n_features_in_ = len(X.columns)
        else:
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
            self.n_features_in_ = 1
        self._columns_out = self._output_columns(X)
        return self

    def transform(self, X):
        """Crop every case; returns an in-memory image frame of the crops.

        Parameters
        ----------
        X : image frame, file frame or ndarray
            The same kind of cases as in ``fit``.

        Returns
        -------
        pandas.DataFrame
            Columns ``image``, ``mask`` (when the input has masks), ``spacing``, then the
            other columns of ``X``.
        """
        check_is_fitted(self, "mode_")
        mode = _volume_mode(X)
        if mode != self.mode_:
            raise ValueError(
                f"LesionCropper was fitted on {self.mode_.upper()} cases but got "
                f"{mode.upper()} cases; use the same kind of input in fit and transform."
            )
        data = self._read(X, mode)
        ndim = 3 if mode == "3d" else 2
        spacing = data.spacing
        if spacing is None:
            warnings.warn(
                "LesionCropper: the input has no spacing (no 'spacing' column): margin_mm, "
                "size_mm and target_spacing are taken in pixels / voxels.",
                UserWarning,
                stacklevel=2,
            )
        rows = range(len(data))
        if self.verbose:
            from tqdm.auto import tqdm

            rows = tqdm(rows, desc="LesionCropper", unit="case")
        images, masks, spacings = [], [], []
        for i in rows:
            img = data.images[i]
            m = data.masks[i] if data.masks is not None else None
            sp = 1.0 if spacing is None else tuple(float(v) for v in spacing[i][:ndim])
            if m is None and self.size_mm is None:
                raise ValueError(
                    f"LesionCropper: {data.case_name(i)} has no mask; crop it with a fixed "
                    "field of view (size_mm=...) or give it a mask."
                )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    crop = crop_lesion(
                        img,
                        m,
                        spacing=sp,
                        margin_mm=self.margin_mm,
                        size_mm=self.size_mm,
                        target_spacing=self.target_spacing,
                        order=self.order,
                        pad_value=self.pad_value,
                    )
                except ValueError as exc:
                    raise ValueError(f"LesionCropper: {data.case_name(i)}: {exc}") from exc
            for w in caught:  # re-emitted with the case they concern
                warnings.warn(
                    f"LesionCropper: {data.case_name(i)}: {w.message}", w.category, stacklevel=2
                )
            out_img, out_mask, out_sp = crop.image, crop.mask, crop.spacing
            if self.mode == "2d" and ndim == 3:
                out_img, out_mask, _ = lesion_slice(out_img, out_mask, method=self.slice_method)
                out_sp = out_sp[1:]
            raw = data.dtype(i)
            if raw is not None and np.dtype(raw) == np.uint8:
                out_img = np.clip(np.rint(out_img), 0, 255).astype(np.uint8)
            images.append(np.ascontiguousarray(out_img))
            masks.append(out_mask)
            spacings.append(tuple(float(v) for v in out_sp))
        has_mask = isinstance(X, pd.DataFrame) and "mask" in X.columns
        index = X.index if isinstance(X, pd.DataFrame) else None
        out = make_image_frame(
            images, masks=masks if has_mask else None, spacing=spacings, index=index
        )
        if isinstance(X, pd.DataFrame):
            for c in X.columns:
                if c not in _READ_COLUMNS:
                    out[c] = X[c].to_numpy()
        return out

    def get_feature_names_out(self, input_features=None):
        """The output columns: ``image``, ``mask``, ``spacing`` and the other input columns.

        Parameters
        ----------
        input_features : ignored

        Returns
        -------
        ndarray of str
        """
        check_is_fitted(self, "mode_")
        return np.asarray(self._columns_out, dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags
