"""Input-level harmonization of medical images across sites (before any network sees them).

Multi-centre images differ in pixel / voxel spacing, reconstruction kernel and intensity
scale. These transformers reduce that covariate shift on the *images*, so that they can be
placed in a :class:`~sklearn.pipeline.Pipeline` in front of a CNN feature transformer or a
fine-tuning classifier:

* :class:`SpacingResampler` resamples every image (linear) and mask (nearest) to a common
  spacing (given, or the training median learnt in ``fit``);
* :class:`HistogramMatcher` maps each image's (or each site's) intensity quantiles onto a
  reference distribution learnt in ``fit`` (monotone piecewise-linear quantile mapping, inside
  masks when present);
* :class:`IntensityWindow` clips CT Hounsfield units to one or several window / level
  settings (several windows become channels);
* :class:`IntensityStandardizer` applies a per-image z-score / percentile / min-max
  standardisation (or a single CT window).

Input and output are the same container: an image array stays an array (when all output images
share one shape), an image frame (:func:`skrtl.make_image_frame`) stays a frame with its masks,
site and other columns kept (and the spacing column updated by the resampler).

**File frames** (:func:`skrtl.read_cohort`: paths in ``image`` / ``mask``) are accepted too.
``fit`` streams them (statistics are computed case by case; :class:`SpacingResampler` reads
only the headers), and ``transform`` returns an **in-memory** image frame: the transformed
images (and the label-selected boolean masks, and the header spacing) as arrays, with every
other column kept and the ``mask_label`` / ``series_uid`` columns dropped (they are applied).
The output thus holds every transformed image in memory: on whole CT / MR volumes put
:class:`skrtl.LesionCropper` first, so that only the lesion crops are kept (a warning says
when a file frame would take more than 2 GiB as arrays).
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils._set_output import _get_output_config
from sklearn.utils.validation import check_is_fitted

from ._base import (
    DEFAULT_SITE_COLUMN,
    SHIFT_CHECK_ROWS,
    HarmonizationWarning,
    ImageEstimatorMixin,
    check_shift_change,
    resolve_unseen,
    site_labels,
    unseen_constraint,
)
from ._cohort import LOADER_ATTR
from ._imaging import ImageInput, first_case_layout, make_image_frame, read_image_frame

__all__ = [
    "CT_WINDOWS",
    "HarmonizationWarning",
    "HistogramMatcher",
    "IntensityStandardizer",
    "IntensityWindow",
    "SpacingResampler",
]


# --------------------------------------------------------------------------------------------
# container helpers
# --------------------------------------------------------------------------------------------
def _guess_mode(X) -> str:
    """'3d' for frames whose masks or spacing (or file headers) say the 3-D images are volumes,
    else '2d'."""
    layout = first_case_layout(X)
    if layout is not None:
        return "3d" if layout == "zyx" else "2d"
    if isinstance(X, pd.DataFrame) and "image" in X.columns and len(X):
        img = np.asarray(X["image"].iloc[0])
        if img.ndim == 3:
            if "mask" in X.columns and X["mask"].iloc[0] is not None:
                if np.asarray(X["mask"].iloc[0]).ndim == 3:
                    return "3d"
            if "spacing" in X.columns and len(tuple(X["spacing"].iloc[0])) == 3:
                return "3d"
    return "2d"


#: a file frame whose images would take more than this as arrays gets a warning
_MAX_IN_MEMORY_BYTES = 2 * 1024**3


def _read(X, name: str, *, transforming: bool = False) -> ImageInput:
    inp = read_image_frame(X, mode=_guess_mode(X), estimator_name=name)
    if transforming and inp.lazy:
        need = inp.nbytes_estimate()
        if need > _MAX_IN_MEMORY_BYTES:
            warnings.warn(
                f"{name}: the {len(inp)} cases of this file frame take about "
                f"{need / 2**30:.1f} GiB as float32 arrays, and the transformed frame holds "
                "them all in memory. Crop the lesions first (skrtl.LesionCropper as the first "
                "Pipeline step) so that only the crops are kept.",
                UserWarning,
                stacklevel=3,
            )
    return inp


def _cases(inp: ImageInput):
    """``(i, image, mask)`` for every sample (a file case is loaded once, with its mask)."""
    for i in range(len(inp)):
        img = inp.images[i]
        yield i, img, (inp.masks[i] if inp.masks is not None else None)


def _rebuild(
    X, images, *, masks=None, spacing=None, name="transformer", frame_out=False, inp=None
):
    """Return the harmonized images in the container of ``X`` (a frame if ``frame_out``).

    A file frame (``inp.lazy``) comes back as an in-memory frame: its loaded masks and header
    spacing replace the paths, and the columns that said how to read a case are dropped.
    """
    if not isinstance(X, pd.DataFrame) and frame_out:
        X = make_image_frame(images)
    if isinstance(X, pd.DataFrame):
        out = X.copy()
        if inp is not None and inp.lazy:
            out = out.drop(columns=[c for c in ("mask_label", "series_uid") if c in out.columns])
            if spacing is None and inp.spacing is not None:
                spacing = list(inp.spacing)
            out.attrs.pop(LOADER_ATTR, None)
        col = np.empty(len(images), dtype=object)
        for i, im in enumerate(images):
            col[i] = im
        out["image"] = col
        if masks is not None:
            mcol = np.empty(len(masks), dtype=object)
            for i, m in enumerate(masks):
                mcol[i] = m
            out["mask"] = mcol
        if spacing is not None:
            scol = np.empty(len(spacing), dtype=object)
            for i, s in enumerate(spacing):
                scol[i] = tuple(float(v) for v in s)
            out["spacing"] = scol
        return out
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(
            f"{name} produced images of different shapes {sorted(shapes)[:3]!r} from an array "
            "input; pass an image frame (skrtl.make_image_frame) to get one back."
        )
    return np.stack(images).astype(np.float32, copy=False)


class _ImageTransformerMixin(ImageEstimatorMixin, TransformerMixin):
    """Shared sklearn plumbing for image-to-image transformers."""

    def get_feature_names_out(self, input_features=None):
        """Image transformers output the input columns (an image frame) unchanged in name."""
        check_is_fitted(self, "n_features_in_")
        names = getattr(self, "feature_names_in_", None)
        if names is None:
            return np.asarray(["image"], dtype=object)
        return np.asarray(names, dtype=object)

    def _frame_out(self) -> bool:
        """``set_output(transform="pandas")``: array input comes back as an image frame."""
        return _get_output_config("transform", self)["dense"] == "pandas"

    def _record_input(self, X):
        if isinstance(X, pd.DataFrame):
            self.feature_names_in_ = np.asarray([str(c) for c in X.columns], dtype=object)
            self.n_features_in_ = len(X.columns)
        else:
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
            self.n_features_in_ = 1


# --------------------------------------------------------------------------------------------
# spacing
# --------------------------------------------------------------------------------------------
def _resample(img, factors, order, anti_aliasing):
    """Zoom the leading ``len(factors)`` axes of ``img`` by ``factors`` (> 1 = more pixels)."""
    nsp = len(factors)
    extra = img.ndim - nsp
    out_shape = tuple(max(1, int(round(s * f))) for s, f in zip(img.shape[:nsp], factors))
    out_shape += img.shape[nsp:]
    src = img
    if anti_aliasing and order > 0 and any(f < 1 for f in factors):
        sigma = [max(0.0, (1.0 / f - 1.0) / 2.0) for f in factors] + [0.0] * extra
        src = ndimage.gaussian_filter(src, sigma=sigma, mode="nearest")
    if out_shape == img.shape:
        return src.astype(np.float32, copy=False)
    zoom = [o / s for o, s in zip(out_shape, img.shape)]
    zoom = [z if i < nsp else 1.0 for i, z in enumerate(zoom)]
    return ndimage.zoom(src, zoom, order=order, mode="nearest", grid_mode=True).astype(
        np.float32, copy=False
    )


class SpacingResampler(_ImageTransformerMixin, BaseEstimator):
    """Resample images and masks to a common pixel / voxel spacing.

    Needs an image frame with a ``spacing`` column (mm per pixel / voxel along each spatial
    axis, e.g. ``(1.0, 0.7, 0.7)`` for ``(D, H, W)``). Images are interpolated (``order``,
    linear by default, with Gaussian anti-aliasing when downsampling), masks with nearest
    neighbour (a lesion that would vanish keeps its most covered pixel). The spacing column is
    updated; images of different sizes stay in an image frame.

    Parameters
    ----------
    target_spacing : "median", float or tuple of float, default="median"
        Output spacing. ``"median"``: the per-axis median spacing of the training images,
        learnt in ``fit``. A float is used for every spatial axis.
    order : int, default=1
        Spline order for images (0 nearest, 1 linear, 3 cubic).
    anti_aliasing : bool, default=True
        Gaussian pre-filter when downsampling.

    Attributes
    ----------
    target_spacing_ : ndarray of shape (ndim,)
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from skrtl import make_image_frame
    >>> X = make_image_frame([np.ones((20, 20)), np.ones((10, 10))], spacing=[(0.5, 0.5), (1, 1)])
    >>> Xr = SpacingResampler(target_spacing=1.0).fit_transform(X)
    >>> [im.shape for im in Xr["image"]]
    [(10, 10), (10, 10)]
    """

    _parameter_constraints: dict = {
        "target_spacing": [
            StrOptions({"median"}),
            Interval(Real, 0, None, closed="neither"),
            tuple,
            list,
            np.ndarray,
        ],
        "order": [Interval(Integral, 0, 5, closed="both")],
        "anti_aliasing": ["boolean"],
    }

    def __init__(self, *, target_spacing="median", order=1, anti_aliasing=True):
        self.target_spacing = target_spacing
        self.order = order
        self.anti_aliasing = anti_aliasing

    def _input(self, X, *, transforming=False):
        lazy = first_case_layout(X) is not None  # a file frame: spacing from the headers
        if not isinstance(X, pd.DataFrame) or ("spacing" not in X.columns and not lazy):
            raise ValueError(
                "SpacingResampler needs an image frame with a 'spacing' column: build X with "
                "skrtl.make_image_frame(images, spacing=[(dz, dy, dx), ...], masks=...), or "
                "read files with skrtl.read_cohort."
            )
        inp = _read(X, "SpacingResampler", transforming=transforming)
        sp = inp.spacing
        if sp is None:
            raise ValueError(
                "SpacingResampler: the cases do not share one number of spatial axes (2-D "
                "images and volumes mixed); resample them separately."
            )
        if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise ValueError(f"spacing must be finite and > 0, got rows like {sp[0]!r}.")
        for i in range(len(inp)):
            shape = inp.shape(i)
            if sp.shape[1] > len(shape):
                raise ValueError(
                    f"{inp.case_name(i)} has shape {shape!r} but spacing has {sp.shape[1]} axes."
                )
        return inp

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn the target spacing (median of the training spacings, or the given one)."""
        inp = self._input(X)
        self._record_input(X)
        nd = inp.spacing.shape[1]
        if isinstance(self.target_spacing, str):
            target = np.median(inp.spacing, axis=0)
        else:
            target = np.atleast_1d(np.asarray(self.target_spacing, dtype=float))
            if target.size == 1:
                target = np.full(nd, float(target[0]))
            if target.shape != (nd,) or np.any(target <= 0) or not np.all(np.isfinite(target)):
                raise ValueError(
                    f"target_spacing={self.target_spacing!r} must be 'median', a positive float "
                    f"or {nd} positive floats (one per spatial axis of the spacing column)."
                )
        self.target_spacing_ = target
        return self

    def transform(self, X):
        """Resample every image and mask to ``target_spacing_``; returns an image frame."""
        check_is_fitted(self, "target_spacing_")
        inp = self._input(X, transforming=True)
        if inp.spacing.shape[1] != self.target_spacing_.size:
            raise ValueError(
                f"spacing has {inp.spacing.shape[1]} axes but {self.target_spacing_.size} in fit."
            )
        images, masks, spacing = [], [], []
        for i, img, m in _cases(inp):
            factors = inp.spacing[i] / self.target_spacing_
            out = _resample(img, factors, self.order, self.anti_aliasing)
            images.append(out)
            nsp = factors.size
            spacing.append(inp.spacing[i] * np.asarray(img.shape[:nsp]) / out.shape[:nsp])
            if inp.masks is not None:
                if m is None:
                    masks.append(None)
                    continue
                mz = [o / s for o, s in zip(out.shape[:nsp], m.shape)]
                mo = ndimage.zoom(m.astype(np.uint8), mz, order=0, mode="nearest", grid_mode=True)
                mo = mo > 0
                if not mo.any():
                    soft = ndimage.zoom(
                        m.astype(np.float32), mz, order=1, mode="grid-constant", grid_mode=True
                    )
                    mo = np.zeros(mo.shape, bool)
                    mo[np.unravel_index(np.argmax(soft), soft.shape)] = True
                masks.append(mo)
        return _rebuild(
            X,
            images,
            masks=masks if inp.masks is not None else None,
            spacing=spacing,
            name="SpacingResampler",
            frame_out=self._frame_out(),
            inp=inp,
        )


# --------------------------------------------------------------------------------------------
# histogram matching
# --------------------------------------------------------------------------------------------
def _monotone_map(values, src_q, ref_q):
    """Piecewise-linear map sending quantiles ``src_q`` to ``ref_q`` (ties merged)."""
    xs, inv = np.unique(src_q, return_inverse=True)
    ys = np.bincount(inv, weights=ref_q) / np.bincount(inv)
    if xs.size == 1:
        return np.full(values.shape, ys[0], dtype=np.float32)
    out = np.interp(values, xs, ys)
    # linear extrapolation beyond the end landmarks, slope of the outer ~10 % of landmarks
    k = max(1, (xs.size - 1) // 10)
    lo_slope = (ys[k] - ys[0]) / (xs[k] - xs[0])
    hi_slope = (ys[-1] - ys[-1 - k]) / (xs[-1] - xs[-1 - k])
    below, above = values < xs[0], values > xs[-1]
    out[below] = ys[0] + lo_slope * (values[below] - xs[0])
    out[above] = ys[-1] + hi_slope * (values[above] - xs[-1])
    return out.astype(np.float32)


def _shift_descriptor(images, masks, mode: str, use_mask: bool) -> np.ndarray:
    """Per image: quantiles of the gradient magnitude (contrast, noise and sharpness).

    Matching fixes the intensity quantiles by construction; what it can make worse is the
    texture of the images in the reference's intensity units.
    """
    out = np.empty((len(images), 5))
    for i, img in enumerate(images):
        img = np.asarray(img, dtype=np.float64)
        if img.ndim == 3 and mode == "2d":  # channel-last: grey level of the channels
            img = img.mean(axis=-1)
        grads = np.gradient(img) if min(img.shape) > 1 else [np.zeros_like(img)]
        grad = np.sqrt(sum(g * g for g in grads))
        m = None
        if use_mask and masks is not None and masks[i] is not None:
            m = np.asarray(masks[i], dtype=bool).reshape(img.shape)
        gvals = grad[m] if m is not None else grad.ravel()
        out[i] = np.percentile(gvals, [10, 25, 50, 75, 90])
    return out


class HistogramMatcher(_ImageTransformerMixin, BaseEstimator):
    """Match each image's (or each site's) intensity distribution to a reference.

    ``fit`` learns reference quantiles (at ``n_quantiles`` evenly spaced levels, averaged over
    the training images, or over the images of ``reference_site``), computed inside the masks
    when ``use_mask`` and masks are present. ``transform`` maps intensities by the monotone
    piecewise-linear function that sends the source quantiles to the reference quantiles
    (Nyul-style standardisation). With ``level="image"`` the source quantiles are each image's
    own (row-wise, no site needed); with ``level="site"`` they are the site's quantiles learnt in
    ``fit`` (the image frame's ``site`` column), which keeps the differences between images of a
    site.

    Parameters
    ----------
    n_quantiles : int, default=101
        Number of landmarks (levels ``linspace(lower, upper, n_quantiles)``).
    quantile_range : (float, float), default=(0.0, 100.0)
        Lowest and highest percentile landmarks; intensities outside the end landmarks are
        extrapolated linearly with the slope of the outer tenth of the landmarks.
    level : {"image", "site"}, default="image"
    reference_site : object, optional
        Site whose distribution is the reference (default: all training images).
    use_mask : bool, default=True
        Compute quantiles inside masks when the frame has them (the whole image is mapped).
    site_column : str, default="site"
        Column of the image frame holding the sites (``level="site"`` and
        ``reference_site``).
    unseen : {"error", "reference", "batch"}, default="error"
        ``level="site"`` only, a site not seen in fit: raise; leave its images unchanged, as
        if they already had the reference distribution (``"reference"``); or take its
        quantiles from its images in the transformed batch (``"batch"``), with a
        :class:`HarmonizationWarning`.
    check_shift : bool, default=True
        In ``transform``, measure for each site of the batch (the whole batch without site
        labels) the discrepancy of its texture to that of the training images (squared MMD
        of per-image quantiles of the gradient magnitude: contrast, noise and sharpness),
        before and after matching, on at most 200 random images of each, and issue a
        :class:`HarmonizationWarning` when matching *increased* it
        (:func:`skrtl._base.check_shift_change`). Matching fixes the intensity quantiles by
        construction, but can make the texture less like the reference's (e.g. images with
        a black border or saturated regions: the rest is compressed).

    Attributes
    ----------
    reference_quantiles_ : ndarray of shape (n_quantiles,)
    site_quantiles_ : dict
        ``level="site"``: site -> quantiles.
    levels_ : ndarray of shape (n_quantiles,)
    """

    _parameter_constraints: dict = {
        "n_quantiles": [Interval(Integral, 2, None, closed="left")],
        "quantile_range": [tuple, list],
        "level": [StrOptions({"image", "site"})],
        "reference_site": "no_validation",
        "use_mask": ["boolean"],
        "site_column": [str],
        "unseen": unseen_constraint(),
        "check_shift": ["boolean"],
    }

    def __init__(
        self,
        *,
        n_quantiles=101,
        quantile_range=(0.0, 100.0),
        level="image",
        reference_site=None,
        use_mask=True,
        site_column=DEFAULT_SITE_COLUMN,
        unseen="error",
        check_shift=True,
    ):
        self.n_quantiles = n_quantiles
        self.quantile_range = quantile_range
        self.level = level
        self.reference_site = reference_site
        self.use_mask = use_mask
        self.site_column = site_column
        self.unseen = unseen
        self.check_shift = check_shift

    def _quantiles(self, inp: ImageInput, rows=None) -> np.ndarray:
        rows = range(len(inp)) if rows is None else rows
        out = np.empty((len(inp), self.levels_.size))
        for i in rows:
            img = inp.images[i]
            vals = img
            m = inp.masks[i] if inp.masks is not None else None
            if self.use_mask and m is not None:
                vals = img[m]  # (k,) or (k, C) for channel-last 2-D images
            out[i] = np.percentile(np.asarray(vals, dtype=np.float64).ravel(), self.levels_)
        return out

    def _sites(self, X, what):
        sites = site_labels(X, site_column=self.site_column, name="HistogramMatcher")
        if sites is None:
            raise ValueError(
                f"HistogramMatcher({what}) needs site labels: pass an image frame with a "
                f"{self.site_column!r} column (skrtl.make_image_frame(images, sites=...)) or "
                "set site_column to the column that holds them."
            )
        return sites

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn the reference quantiles (and, for ``level="site"``, each site's)."""
        lo, hi = (float(v) for v in self.quantile_range)
        if not (0.0 <= lo < hi <= 100.0):
            raise ValueError(
                f"quantile_range={self.quantile_range!r} must be (lower, upper) percentiles with "
                "0 <= lower < upper <= 100."
            )
        inp = _read(X, "HistogramMatcher")
        self._record_input(X)
        self.levels_ = np.linspace(lo, hi, self.n_quantiles)
        q = self._quantiles(inp)
        if self.reference_site is not None:
            sites = self._sites(X, f"reference_site={self.reference_site!r}")
            rows = sites == str(self.reference_site)
            rows = np.asarray(rows, dtype=bool)
            if not rows.any():
                raise ValueError(
                    f"reference_site={self.reference_site!r} is not among the training sites "
                    f"{sorted(set(sites))!r}."
                )
            self.reference_quantiles_ = q[rows].mean(axis=0)
        else:
            self.reference_quantiles_ = q.mean(axis=0)
        self.site_quantiles_ = {}
        if self.level == "site":
            sites = self._sites(X, "level='site'")
            for s in sorted(set(sites)):
                self.site_quantiles_[s] = q[sites == s].mean(axis=0)
        self._shift_reference = None
        if self.check_shift:
            rows = self._check_rows(len(inp))
            Xr = X.iloc[rows] if isinstance(X, pd.DataFrame) else np.asarray(X)[rows]
            inp_r = _read(Xr, "HistogramMatcher")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", HarmonizationWarning)
                raw, mapped, masks = self._mapped(Xr, inp_r, keep_raw=range(len(inp_r)))
            mode = _guess_mode(Xr)
            raw = [raw[i] for i in range(len(inp_r))]
            self._shift_reference = (
                _shift_descriptor(raw, masks, mode, self.use_mask),
                _shift_descriptor(mapped, masks, mode, self.use_mask),
            )
        return self

    @staticmethod
    def _check_rows(n, rows=None):
        rows = np.arange(n) if rows is None else np.asarray(rows)
        if rows.size <= SHIFT_CHECK_ROWS:
            return rows
        return np.sort(np.random.default_rng(0).choice(rows, SHIFT_CHECK_ROWS, replace=False))

    def transform(self, X):
        """Map intensities onto the reference distribution (same container as ``X``)."""
        check_is_fitted(self, "reference_quantiles_")
        inp = _read(X, "HistogramMatcher", transforming=True)
        groups = {}
        if self.check_shift and getattr(self, "_shift_reference", None) is not None:
            groups = self._check_groups(X, len(inp))
        keep = set().union(*groups.values()) if groups else set()
        raw, images, masks = self._mapped(X, inp, keep_raw=keep)
        if groups:
            self._check_batch(X, groups, raw, images, masks)
        return _rebuild(
            X,
            images,
            masks=masks if (inp.lazy and inp.masks is not None) else None,
            name="HistogramMatcher",
            frame_out=self._frame_out(),
            inp=inp,
        )

    def _check_groups(self, X, n):
        """Site (None without site labels) -> the rows of the batch the shift is measured on."""
        sites = site_labels(X, site_column=self.site_column, name="HistogramMatcher")
        groups = (
            {None: np.arange(n)}
            if sites is None
            else {s: np.flatnonzero(sites == s) for s in sorted(set(sites))}
        )
        groups = {s: self._check_rows(n, rows) for s, rows in groups.items()}
        return {s: [int(i) for i in rows] for s, rows in groups.items() if len(rows) >= 2}

    def _check_batch(self, X, groups, raw, images, masks) -> None:
        """Warn for each site of the batch whose shift to the training images grew."""
        mode = _guess_mode(X)
        ref_before, ref_after = self._shift_reference
        for site, rows in groups.items():
            m = [masks[i] for i in rows]
            check_shift_change(
                (ref_before, _shift_descriptor([raw[i] for i in rows], m, mode, self.use_mask)),
                (ref_after, _shift_descriptor([images[i] for i in rows], m, mode, self.use_mask)),
                name="HistogramMatcher",
                what="the transformed images" if site is None else f"site {site!r}",
                what_reference="the training images (texture: gradient quantiles)",
                stacklevel=4,
            )

    def _mapped(self, X, inp: ImageInput, *, keep_raw=()):
        """``(raw images of the rows keep_raw, mapped images, masks)`` (each case loaded once)."""
        ref = self.reference_quantiles_
        if self.level == "image":
            src = None  # each image's own quantiles, computed when it is mapped
        else:
            sites = self._sites(X, "level='site'")
            new = sorted(set(sites) - set(self.site_quantiles_))
            src = np.empty((len(inp), ref.size))
            unseen = resolve_unseen(self.unseen, "HistogramMatcher")
            if new and unseen == "error":
                raise ValueError(
                    f"sites {new!r} were not seen in fit (known: "
                    f"{sorted(self.site_quantiles_)!r}). Refit with them, use level='image', "
                    "unseen='reference' to leave their images unchanged, or unseen='batch' to "
                    "estimate their histogram from the transformed batch."
                )
            if new and unseen == "reference":
                for s in new:
                    src[sites == s] = ref
            elif new:
                q = self._quantiles(inp, rows=np.flatnonzero(np.isin(sites, new)))
                for s in new:
                    warnings.warn(
                        f"site {s!r} was not seen in fit; its quantiles are estimated from its "
                        f"{int((sites == s).sum())} images in this batch (unseen='batch').",
                        HarmonizationWarning,
                        stacklevel=3,
                    )
                    src[sites == s] = q[sites == s].mean(axis=0)
            for s, qs in self.site_quantiles_.items():
                src[sites == s] = qs
        raw, images, masks = {}, [], []
        for i, img, m in _cases(inp):
            if src is None:
                vals = img[m] if (self.use_mask and m is not None) else img
                qs = np.percentile(np.asarray(vals, dtype=np.float64).ravel(), self.levels_)
            else:
                qs = src[i]
            images.append(_monotone_map(img, qs, ref))
            masks.append(m)
            if i in keep_raw:
                raw[i] = img
        return raw, images, masks


# --------------------------------------------------------------------------------------------
# intensity standardisation
# --------------------------------------------------------------------------------------------
class IntensityStandardizer(_ImageTransformerMixin, BaseEstimator):
    """CT windowing or per-image intensity standardisation.

    Parameters
    ----------
    method : {"window", "zscore", "percentile", "minmax"}, default="zscore"
        ``"window"``: clip to the CT window ``(level, width)`` in HU and rescale to [0, 1]
        (identical across sites by construction: HU are absolute). ``"zscore"``: subtract the
        image mean and divide by its standard deviation (inside the mask when present; MRI,
        ultrasound). ``"percentile"``: clip to ``percentiles`` (inside the mask) and rescale to
        [0, 1]. ``"minmax"``: per-image min-max to [0, 1].
    window : (float, float), default=(40.0, 400.0)
        CT window ``(level, width)`` for ``method="window"`` (soft tissue by default; lung:
        ``(-600, 1500)``).
    percentiles : (float, float), default=(0.5, 99.5)
    use_mask : bool, default=True
        Statistics inside masks when present.

    Attributes
    ----------
    n_features_in_ : int
    """

    _parameter_constraints: dict = {
        "method": [StrOptions({"window", "zscore", "percentile", "minmax"})],
        "window": [tuple, list],
        "percentiles": [tuple, list],
        "use_mask": ["boolean"],
    }

    def __init__(
        self, *, method="zscore", window=(40.0, 400.0), percentiles=(0.5, 99.5), use_mask=True
    ):
        self.method = method
        self.window = window
        self.percentiles = percentiles
        self.use_mask = use_mask

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Validate parameters and input (the transform is per image and learns nothing)."""
        if self.method == "window":
            level, width = (float(v) for v in self.window)
            if not width > 0:
                raise ValueError(f"window=(level, width) needs width > 0, got {self.window!r}.")
        lo, hi = (float(v) for v in self.percentiles)
        if not (0.0 <= lo < hi <= 100.0):
            raise ValueError(
                f"percentiles={self.percentiles!r} must satisfy 0 <= lower < upper <= 100."
            )
        _read(X, "IntensityStandardizer")
        self._record_input(X)
        return self

    def transform(self, X):
        """Standardise every image (same container as ``X``)."""
        check_is_fitted(self, "n_features_in_")
        inp = _read(X, "IntensityStandardizer", transforming=True)
        out, masks = [], []
        for _, img, mask in _cases(inp):
            masks.append(mask)
            m = mask if self.use_mask else None
            ref = img[m] if m is not None else img
            if self.method == "window":
                level, width = (float(v) for v in self.window)
                res = np.clip((img - (level - width / 2.0)) / width, 0.0, 1.0)
            elif self.method == "zscore":
                sd = float(ref.std())
                res = (img - float(ref.mean())) / (sd if sd > 0 else 1.0)
            else:
                if self.method == "percentile":
                    lo, hi = np.percentile(ref, [float(v) for v in self.percentiles])
                else:
                    lo, hi = float(img.min()), float(img.max())
                res = np.clip((img - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(img)
            out.append(res.astype(np.float32))
        return _rebuild(
            X,
            out,
            masks=masks if (inp.lazy and inp.masks is not None) else None,
            name="IntensityStandardizer",
            frame_out=self._frame_out(),
            inp=inp,
        )


# --------------------------------------------------------------------------------------------
# CT window / level
# --------------------------------------------------------------------------------------------
#: Common CT windows ``(level, width)`` in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "liver": (60.0, 160.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


def _parse_windows(windows) -> list[tuple[float, float]]:
    """Validate ``windows``: a preset name, one ``(level, width)`` or a list of them."""
    items = [windows] if isinstance(windows, str) else windows
    if (
        isinstance(items, tuple | list | np.ndarray)
        and len(items) == 2
        and all(isinstance(v, Real) and not isinstance(v, bool) for v in items)
    ):
        items = [tuple(items)]
    out = []
    try:
        for w in items:
            if isinstance(w, str):
                if w not in CT_WINDOWS:
                    raise KeyError(w)
                out.append(CT_WINDOWS[w])
                continue
            level, width = (float(v) for v in w)
            if not (np.isfinite(level) and np.isfinite(width) and width > 0):
                raise ValueError(w)
            out.append((level, width))
    except (TypeError, ValueError, KeyError):
        out = []
    if not out:
        raise ValueError(
            f"windows={windows!r} is not valid: give a preset name "
            f"{sorted(CT_WINDOWS)!r}, one (level, width) pair in HU with width > 0, or a list "
            "of them, e.g. windows=['soft_tissue', (-600, 1500)]."
        )
    return out


class IntensityWindow(_ImageTransformerMixin, BaseEstimator):
    """CT window / level: clip Hounsfield units to one or several windows, rescale to [0, 1].

    Each window ``(level, width)`` maps ``level - width / 2`` to 0 and ``level + width / 2`` to
    1, clipping outside. HU are absolute, so windowing is the same at every site and learns
    nothing (``fit`` only validates). With several windows, each becomes one output channel
    (2-D images ``(H, W)`` become ``(H, W, n_windows)``), the usual way to feed a CT slice to a
    3-channel ImageNet CNN (e.g. soft tissue, lung and bone windows).

    Parameters
    ----------
    windows : str, (float, float) or list of them, default="soft_tissue"
        Preset names (see ``CT_WINDOWS``: ``"soft_tissue"`` (40, 400), ``"mediastinum"``
        (50, 350), ``"lung"`` (-600, 1500), ``"liver"`` (60, 160), ``"bone"`` (400, 1800),
        ``"brain"`` (40, 80)) or ``(level, width)`` pairs in HU.
    output : {"unit", "hu"}, default="unit"
        ``"unit"``: rescale each window to [0, 1]; ``"hu"``: only clip, keep HU.

    Attributes
    ----------
    windows_ : list of (float, float)
        The resolved ``(level, width)`` pairs.
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> ct = np.array([[[-1000.0, 40.0], [240.0, 1000.0]]])  # one 2x2 slice in HU
    >>> IntensityWindow(windows="soft_tissue").fit_transform(ct)[0]
    array([[0. , 0.5],
           [1. , 1. ]], dtype=float32)
    >>> IntensityWindow(windows=["soft_tissue", "lung"]).fit_transform(ct).shape
    (1, 2, 2, 2)
    """

    _parameter_constraints: dict = {
        "windows": [str, tuple, list, np.ndarray],
        "output": [StrOptions({"unit", "hu"})],
    }

    def __init__(self, *, windows="soft_tissue", output="unit"):
        self.windows = windows
        self.output = output

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Validate ``windows`` and the input (windowing learns nothing)."""
        self.windows_ = _parse_windows(self.windows)
        inp = _read(X, "IntensityWindow")
        self._check_images(inp)
        self._record_input(X)
        return self

    def _check_images(self, inp: ImageInput) -> None:
        if len(self.windows_) > 1:
            bad = [i for i in range(len(inp)) if len(inp.shape(i)) != 2]
            if bad:
                raise ValueError(
                    f"IntensityWindow with {len(self.windows_)} windows stacks them as channels "
                    f"of 2-D (H, W) images, but {inp.case_name(bad[0])} has shape "
                    f"{inp.shape(bad[0])!r}. Use one window per IntensityWindow for "
                    "volumes, or give the windows to PretrainedCNNFeatures(windows=...), which "
                    "applies them after slicing."
                )

    def transform(self, X):
        """Window every image (same container as ``X``; channels last for several windows)."""
        check_is_fitted(self, "windows_")
        inp = _read(X, "IntensityWindow", transforming=True)
        self._check_images(inp)
        out, masks = [], []
        for _, img, mask in _cases(inp):
            masks.append(mask)
            chans = []
            for level, width in self.windows_:
                lo, hi = level - width / 2.0, level + width / 2.0
                c = np.clip(img, lo, hi)
                chans.append((c - lo) / width if self.output == "unit" else c)
            res = chans[0] if len(chans) == 1 else np.stack(chans, axis=-1)
            out.append(res.astype(np.float32))
        return _rebuild(
            X,
            out,
            masks=masks if (inp.lazy and inp.masks is not None) else None,
            name="IntensityWindow",
            frame_out=self._frame_out(),
            inp=inp,
        )
