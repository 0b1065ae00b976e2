"""Handcrafted (IBSI) radiomics features as a scikit-learn transformer, wrapping PyRadiomics.

:class:`RadiomicsFeatures` takes the same input as skrtl's CNN transformers -- an image frame
from :func:`skrtl.make_image_frame` (images, masks, spacing) or a plain array of images -- and
returns one row of PyRadiomics features per sample, with PyRadiomics' own feature names
(``original_firstorder_Mean``, ``original_glcm_Contrast``, ``wavelet-LH_glszm_ZoneEntropy``,
...). Because it reads the frame, it can sit next to :class:`skrtl.PretrainedCNNFeatures` in a
:class:`~sklearn.pipeline.FeatureUnion` (deep + handcrafted fusion) and is refitted inside every
cross-validation fold like any other step.

PyRadiomics is an optional dependency: ``pip install "skrtl[radiomics]"`` (installs
``pyradiomics-bhklab`` and ``SimpleITK``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from numbers import Integral, Real

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._base import PassthroughMixin
from ._imaging import first_case_layout, read_image_frame
from .utils import hash_array, open_disk_cache

__all__ = ["RADIOMICS_FEATURE_CLASSES", "RadiomicsFeatures", "otsu_mask"]

#: Feature classes accepted by ``RadiomicsFeatures(features=...)``. ``"shape"`` is mapped to
#: PyRadiomics' ``"shape2D"`` for 2-D images.
RADIOMICS_FEATURE_CLASSES = (
    "firstorder",
    "shape",
    "shape2D",
    "glcm",
    "glrlm",
    "glszm",
    "gldm",
    "ngtdm",
)
_DEFAULT_CLASSES = ("firstorder", "shape", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
_INSTALL_HINT = 'pip install "skrtl[radiomics]"  (installs pyradiomics-bhklab and SimpleITK)'


def _import_radiomics():
    """Import PyRadiomics and SimpleITK or raise an ImportError that says how to install them."""
    try:
        import radiomics  # noqa: F401
        import SimpleITK  # noqa: F401
        from radiomics import featureextractor
    except ImportError as exc:
        raise ImportError(
            f"RadiomicsFeatures needs the optional PyRadiomics extra ({exc.name!r} could not be "
            f"imported). Install it with: {_INSTALL_HINT}"
        ) from exc
    return featureextractor


@contextlib.contextmanager
def _quiet_radiomics(verbose: int):
    """Silence PyRadiomics' INFO/WARNING logging for the duration of an extraction."""
    logger = logging.getLogger("radiomics")
    old = logger.level
    if verbose < 2:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def otsu_mask(image: np.ndarray, *, nbins: int = 256) -> np.ndarray:
    """Foreground mask by Otsu's threshold (pixels above the threshold).

    A simple automatic region of interest when no segmentation is available (e.g. the lesion
    in a cropped ultrasound image). Falls back to the whole image when the image is constant
    or the threshold leaves fewer than 2 pixels on either side.

    Parameters
    ----------
    image : ndarray
        2-D image or 3-D volume.
    nbins : int, default=256
        Histogram bins.

    Returns
    -------
    ndarray of bool
        Same shape as ``image``.
    """
    img = np.asarray(image, dtype=np.float64)
    lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return np.ones(img.shape, dtype=bool)
    hist, edges = np.histogram(img, bins=nbins, range=(lo, hi))
    centers = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(float)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m0 / w0
        mu1 = (m0[-1] - m0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    thr = centers[int(np.argmax(between))]
    mask = img > thr
    if mask.sum() < 2 or (~mask).sum() < 2:
        return np.ones(img.shape, dtype=bool)
    return mask


def _first(func, *args):
    """``func(*args)[0]`` (a joblib job returning one result)."""
    return func(*args)[0]


def _extract_one(
    image: np.ndarray,
    mask: np.ndarray,
    spacing,
    *,
    features: dict,
    image_types: dict,
    settings: dict,
    verbose: int,
    index: int,
    errors: str,
) -> dict | None:
    """PyRadiomics features of one sample (``None`` on failure when ``errors="nan"``)."""
    import SimpleITK as sitk

    featureextractor = _import_radiomics()
    with _quiet_radiomics(verbose):
        extractor = featureextractor.RadiomicsFeatureExtractor(**settings)
        extractor.disableAllFeatures()
        extractor.enableFeaturesByName(**features)
        extractor.disableAllImageTypes()
        extractor.enableImageTypes(**image_types)
        img = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float64))
        if spacing is not None:
            img.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # SimpleITK is (x, y, z)
        msk = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
        msk.CopyInformation(img)
        try:
            result = extractor.execute(img, msk, label=1)
        except Exception as exc:
            if errors == "nan":
                return None
            raise ValueError(
                f"PyRadiomics failed on sample {index} (image shape {image.shape!r}, "
                f"{int(mask.sum())} mask pixels): {exc} Check that sample's mask (a region of "
                "at least a few pixels is needed), or pass errors='nan' to get a NaN row "
                "instead (impute it downstream)."
            ) from exc
    return {
        key: float(np.asarray(val, dtype=np.float64))
        for key, val in result.items()
        if not key.startswith("diagnostics_")
    }


class RadiomicsFeatures(PassthroughMixin, TransformerMixin, BaseEstimator):
    """Handcrafted radiomics features (PyRadiomics, IBSI-aligned) from images and masks.

    One row per sample: first-order statistics, shape, and texture matrices (GLCM, GLRLM,
    GLSZM, GLDM, NGTDM) of the region of interest, on the original image and optionally on
    filtered images (Laplacian of Gaussian, wavelet, ...). Feature names are PyRadiomics' own
    (``original_glcm_Contrast``), so results line up with studies that used PyRadiomics.

    Parameters
    ----------
    features : "auto", list of str or dict, default="auto"
        Feature classes to compute: ``"auto"`` = all of ``firstorder``, ``shape`` (``shape2D``
        for 2-D images), ``glcm``, ``glrlm``, ``glszm``, ``gldm``, ``ngtdm``; a list of class
        names; or a dict ``{class: [feature names] or None}`` (``None`` = all features of that
        class, e.g. ``{"firstorder": ["Mean", "Entropy"], "glcm": None}``).
    image_types : dict or None, default=None
        PyRadiomics image types (filters) and their settings, e.g.
        ``{"Original": {}, "LoG": {"sigma": [1.0, 3.0]}, "Wavelet": {}}``. ``None`` means
        ``{"Original": {}}``. Shape features are computed once, on the original mask.
    settings : dict or None, default=None
        PyRadiomics extraction settings passed through unchanged, e.g. ``{"binWidth": 25,
        "resampledPixelSpacing": [1, 1, 1], "interpolator": "sitkBSpline", "normalize":
        True}``. ``None`` uses PyRadiomics' defaults (``binWidth=25``: for images scaled to
        [0, 1] pass a much smaller bin width, e.g. 0.05, or set ``binCount``).
    mode : {"auto", "2d", "3d"}, default="auto"
        ``"auto"``: 2-D arrays per sample are images, 3-D arrays are volumes ``(D, H, W)``.
        ``"2d"`` also accepts channel-last ``(H, W, C)`` images, averaged to grayscale.
    missing_mask : {"error", "whole", "otsu"}, default="error"
        What to do for samples without a mask: raise, use the whole image as the region of
        interest, or use an Otsu-threshold foreground mask (:func:`otsu_mask`).
    label : int, sequence of int or None, default=None
        Structure of a multi-label mask to describe (a sequence: the union of those labels);
        rows of a frame with a ``mask_label`` column (:func:`skrtl.read_cohort` with
        ``label=``) use their own label, and a row label that differs from ``label`` raises.
        PyRadiomics' own ``settings["label"]`` is honoured as well (giving both with different
        values raises). ``None`` (and no ``settings["label"]``) requires masks with a single
        non-zero value: a mask with several labels raises instead of silently merging the
        structures. A label absent from a mask raises, listing the labels present.
    errors : {"raise", "nan"}, default="raise"
        When PyRadiomics fails on a sample (e.g. a 1-pixel mask): raise a ``ValueError``
        naming the sample, or return a row of NaN (impute it downstream).
    n_jobs : int or None, default=None
        Samples processed in parallel with joblib (``None`` = 1, ``-1`` = all cores). Cases of
        a file frame are loaded inside the worker that extracts them.
    cache_dir : str, path or None, default=None
        A folder for a persistent cache of the extracted features, shared by processes and
        runs (safe with concurrent writers; stored as JSON, never pickled). Keyed by the image
        and mask content (the file identity for cohort files), the spacing, the label, every
        extraction setting and the PyRadiomics version: a rerun, or another process, over the
        same cohort reads the features instead of running PyRadiomics again.
    cache_size_mb : float, default=2048
        Size bound of the ``cache_dir`` cache.
    passthrough : str, list of str or None, default=None
        Columns of the image frame appended, unchanged, after the features (e.g.
        ``["site", "age"]``); non-numeric ones need ``set_output(transform="pandas")``. See
        :class:`skrtl.PretrainedCNNFeatures`.
    verbose : int, default=0
        0: silent; 1: progress bar; 2: also PyRadiomics' own log messages.

    Attributes
    ----------
    feature_names_out_ : ndarray of str
        PyRadiomics feature names, in output column order.
    n_features_out_ : int
        Number of output columns (features, then the passthrough columns).
    passthrough_ : list of str
        The passthrough columns (empty without ``passthrough``).
    ndim_ : int
        Spatial dimensionality seen during fit (2 or 3).
    feature_classes_ : dict
        Feature classes actually enabled (``shape`` resolved to ``shape2D`` for 2-D).

    Notes
    -----
    Image spacing (frame column ``spacing``, in array axis order, mm) is passed to PyRadiomics,
    so shape features are in physical units and ``resampledPixelSpacing`` works. The selected
    label (or the single non-zero value) is the region of interest. ``fit`` only extracts
    features of the first sample to fix the feature names; ``fit_transform`` extracts every
    sample once.

    Examples
    --------
    >>> import numpy as np
    >>> from skrtl import make_image_frame
    >>> from skrtl._radiomics import RadiomicsFeatures
    >>> rng = np.random.default_rng(0)
    >>> images = rng.normal(100, 20, size=(3, 32, 32))
    >>> masks = np.zeros((3, 32, 32), bool)
    >>> masks[:, 8:24, 10:22] = True
    >>> X = make_image_frame(images, masks=masks, spacing=(0.5, 0.5))
    >>> rad = RadiomicsFeatures(features=["firstorder", "glcm"], settings={"binWidth": 10})
    >>> F = rad.fit_transform(X)  # doctest: +SKIP
    >>> rad.get_feature_names_out()[:2]  # doctest: +SKIP
    array(['original_firstorder_10Percentile', 'original_firstorder_90Percentile'], dtype=object)
    """

    _parameter_constraints: dict = {
        "features": [StrOptions({"auto"}), list, tuple, dict],
        "image_types": [dict, None],
        "settings": [dict, None],
        "mode": [StrOptions({"auto", "2d", "3d"})],
        "missing_mask": [StrOptions({"error", "whole", "otsu"})],
        "label": [Interval(Integral, 1, None, closed="left"), list, tuple, None],
        "errors": [StrOptions({"raise", "nan"})],
        "n_jobs": [Integral, None],
        "cache_dir": [str, os.PathLike, None],
        "cache_size_mb": [Interval(Real, 0, None, closed="neither")],
        "passthrough": [str, list, tuple, None],
        "verbose": [Interval(Integral, 0, None, closed="left"), bool],
    }

    def __init__(
        self,
        *,
        features="auto",
        image_types=None,
        settings=None,
        mode="auto",
        missing_mask="error",
        label=None,
        errors="raise",
        n_jobs=None,
        cache_dir=None,
        cache_size_mb=2048,
        passthrough=None,
        verbose=0,
    ):
        self.features = features
        self.image_types = image_types
        self.settings = settings
        self.mode = mode
        self.missing_mask = missing_mask
        self.label = label
        self.errors = errors
        self.n_jobs = n_jobs
        self.cache_dir = cache_dir
        self.cache_size_mb = cache_size_mb
        self.passthrough = passthrough
        self.verbose = verbose

    # ------------------------------------------------------------------ input handling
    def _resolve_mode(self, X) -> str:
        if self.mode != "auto":
            return self.mode
        if isinstance(X, pd.DataFrame) and "image" in X.columns and len(X):
            layout = first_case_layout(X)  # a file frame: the first header decides
            if layout is not None:
                return "3d" if layout == "zyx" else "2d"
            first = np.asarray(X["image"].iloc[0])
            return "3d" if first.ndim == 3 else "2d"
        arr = np.asarray(X) if isinstance(X, list | tuple) else X
        if isinstance(arr, np.ndarray) and arr.dtype != object and arr.ndim == 4:
            return "3d"
        if isinstance(arr, np.ndarray) and arr.dtype == object and arr.size:
            return "3d" if np.asarray(arr.flat[0]).ndim == 3 else "2d"
        return "2d"

    def _label(self):
        """The label to select: ``label`` or PyRadiomics' ``settings["label"]``."""
        own = (self.settings or {}).get("label")
        if self.label is not None and own is not None and own != self.label:
            raise ValueError(
                f"label={self.label!r} and settings['label']={own!r} disagree; give the label "
                "once (either is fine)."
            )
        return self.label if self.label is not None else own

    def _empty_mask_error(self, exc: Exception) -> Exception:
        name = type(self).__name__
        if "is empty" in str(exc):
            return ValueError(
                f"{name}: {str(exc).split(':')[0]} -- radiomics features are computed "
                "inside the mask, so every mask needs at least a few non-zero pixels. Fix "
                "or drop that sample, or drop its mask and set missing_mask='whole' or "
                "'otsu'."
            )
        return exc

    def _read(self, X):
        """Validated image input (lazy for file frames), its mode and spatial ndim."""
        mode = self._resolve_mode(X)
        name = type(self).__name__
        try:
            data = read_image_frame(X, mode=mode, label=self._label(), estimator_name=name)
        except ValueError as exc:
            new = self._empty_mask_error(exc)
            if new is exc:
                raise
            raise new from exc
        ndim = 3 if mode == "3d" else 2
        if self.missing_mask == "error":
            for i in range(len(data)):
                if not data.has_mask(i):
                    raise ValueError(
                        f"{name}: sample {i} has no mask. Radiomics features describe a region "
                        "of interest: pass X=skrtl.make_image_frame(images, masks=masks), or "
                        "set missing_mask='whole' (entire image) or 'otsu' (automatic "
                        "foreground)."
                    )
        if data.spacing is not None:
            sp = np.asarray(data.spacing, dtype=float)
            if sp.shape[1] != ndim:
                raise ValueError(
                    f"{name}: spacing has {sp.shape[1]} values per sample but the images are "
                    f"{ndim}-D; give one spacing per array axis (e.g. (row, col) mm for 2-D, "
                    "(z, y, x) mm for volumes)."
                )
            if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
                raise ValueError(f"{name}: spacing must be finite and positive, got {sp!r}.")
        return data, mode, ndim

    def _sample(self, data, i: int, mode: str):
        """``(image, mask, spacing)`` of sample ``i`` (a file case is loaded now)."""
        try:
            img = data.images[i]
            m = data.masks[i] if data.masks is not None else None
        except ValueError as exc:
            new = self._empty_mask_error(exc)
            if new is exc:
                raise
            raise new from exc
        if mode == "2d" and img.ndim == 3:  # (H, W, C) -> grayscale
            img = img.mean(axis=-1)
        if m is None:
            m = np.ones(img.shape, dtype=bool) if self.missing_mask == "whole" else otsu_mask(img)
        sp = None if data.spacing is None else np.asarray(data.spacing[i], dtype=float)
        return img, m, sp

    def _extract_rows(self, X, rows, mode: str, kwargs: dict) -> list:
        """Features of the rows ``rows`` of a (one-row) frame, read inside a joblib worker."""
        data, _, _ = self._read(X)
        out = []
        for i, pos in enumerate(rows):
            img, m, sp = self._sample(data, i, mode)
            out.append(_extract_one(img, m, sp, index=pos, **kwargs))
        return out

    def _feature_classes(self, ndim: int) -> dict:
        spec = self.features
        if isinstance(spec, str):
            spec = dict.fromkeys(_DEFAULT_CLASSES)
        elif isinstance(spec, list | tuple):
            spec = dict.fromkeys(spec)
        out = {}
        for cls, names in spec.items():
            if cls not in RADIOMICS_FEATURE_CLASSES:
                raise ValueError(
                    f"features contains unknown feature class {cls!r}; allowed: "
                    f"{list(RADIOMICS_FEATURE_CLASSES)!r}."
                )
            if cls in ("shape", "shape2D"):
                cls = "shape2D" if ndim == 2 else "shape"
            if isinstance(names, str):
                names = [names]
            if names is not None:
                names = [str(n) for n in names]
            out[cls] = names
        if not out:
            raise ValueError("features is empty: enable at least one feature class.")
        return out

    def _image_types(self) -> dict:
        if self.image_types is None:
            return {"Original": {}}
        from radiomics import getImageTypes

        allowed = list(getImageTypes())
        for key, val in self.image_types.items():
            if key not in allowed:
                raise ValueError(
                    f"image_types contains unknown image type {key!r}; PyRadiomics supports "
                    f"{allowed!r}."
                )
            if not isinstance(val, dict):
                raise ValueError(
                    f"image_types[{key!r}] must be a dict of settings (e.g. {{}} or "
                    f"{{'sigma': [1.0, 3.0]}} for LoG), got {val!r}."
                )
        if not self.image_types:
            raise ValueError("image_types is empty: pass None for {'Original': {}}.")
        return dict(self.image_types)

    # ------------------------------------------------------------------ extraction
    def _extract(self, X, data, mode: str, rows=None) -> list:
        """PyRadiomics results of the samples ``rows`` (default: all), in order.

        In-memory samples are sent to the workers as arrays; file cases are loaded inside
        the worker that extracts them (one case in memory per worker).
        """
        kwargs = {
            "features": self.feature_classes_,
            "image_types": self._image_types(),
            "settings": {k: v for k, v in (self.settings or {}).items() if k != "label"},
            "verbose": int(self.verbose),
            "errors": self.errors,
        }
        rows = list(range(len(data))) if rows is None else list(rows)
        if self.cache_dir is not None:
            return self._extract_cached(X, data, mode, rows, kwargs)
        return self._run(X, data, mode, rows, kwargs)

    def _cache_keys(self, data, rows, kwargs) -> list[bytes]:
        import radiomics

        base = json.dumps(
            [kwargs["features"], kwargs["image_types"], kwargs["settings"], self.label,
             self.missing_mask, getattr(radiomics, "__version__", "?")],
            sort_keys=True, default=str,
        ).encode()  # fmt: skip
        keys = []
        for i in rows:
            h = hashlib.blake2b(b"radiomics-v1" + base, digest_size=20)
            if data.keys is not None and data.keys[i] is not None:
                h.update(data.keys[i])  # a file case: its identity, nothing loaded
            else:
                img = data.images[i]
                hash_array(h, img)
                m = data.masks[i] if data.masks is not None else None
                h.update(b"nomask" if m is None else np.packbits(m).tobytes() + bytes(m.shape))
                sp = None if data.spacing is None else np.asarray(data.spacing[i], float)
                h.update(b"nospacing" if sp is None else sp.tobytes())
            keys.append(h.digest())
        return keys

    def _extract_cached(self, X, data, mode, rows, kwargs) -> list:
        disk = open_disk_cache(self.cache_dir, max_mb=self.cache_size_mb)
        keys = self._cache_keys(data, rows, kwargs)
        results: list = [disk.get_json(k) for k in keys]
        todo = [j for j, r in enumerate(results) if r is None]
        if todo:
            fresh = self._run(X, data, mode, [rows[j] for j in todo], kwargs)
            for j, res in zip(todo, fresh):
                results[j] = res
                if res is not None:  # failures are tried again next time
                    disk.put_json(keys[j], res)
        return results

    def _run(self, X, data, mode, rows, kwargs) -> list:
        n_jobs = 1 if self.n_jobs is None else self.n_jobs
        if n_jobs == 1:
            results = (_extract_one(*self._sample(data, i, mode), index=i, **kwargs) for i in rows)
        else:
            from joblib import Parallel, delayed

            if data.lazy:
                jobs = (
                    delayed(_first)(self._extract_rows, X.iloc[[i]], [i], mode, kwargs)
                    for i in rows
                )
            else:
                jobs = (
                    delayed(_extract_one)(*self._sample(data, i, mode), index=i, **kwargs)
                    for i in rows
                )
            results = Parallel(n_jobs=n_jobs, return_as="generator")(jobs)
        if self.verbose:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(rows), desc="radiomics", unit="image")
        return list(results)

    def _to_matrix(self, results: list) -> np.ndarray:
        names = self.feature_names_out_
        out = np.full((len(results), names.size), np.nan)
        for i, res in enumerate(results):
            if res is None:
                continue
            missing = [n for n in names if n not in res]
            if missing and self.errors == "raise":
                raise ValueError(
                    f"sample {i} lacks {len(missing)} features seen in fit (e.g. "
                    f"{missing[0]!r}); all samples must have the same dimensionality and "
                    "image types."
                )
            out[i] = [res.get(n, np.nan) for n in names]
        return out

    def _prepare_fit(self, X):
        _import_radiomics()
        data, mode, ndim = self._read(X)
        self._fit_passthrough(X)
        self.ndim_ = ndim
        self.feature_classes_ = self._feature_classes(ndim)
        self._image_types()  # validate early
        return data, mode

    def _set_names(self, results: list) -> None:
        first = next((r for r in results if r is not None), None)
        if first is None:
            raise ValueError(
                "PyRadiomics failed on every sample given to fit (errors='nan'), so the "
                "feature names are unknown; check the masks and settings."
            )
        self.feature_names_out_ = np.asarray(list(first), dtype=object)
        self.n_features_out_ = int(self.feature_names_out_.size) + len(self.passthrough_)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Check the input and settings and fix the output feature names.

        Parameters
        ----------
        X : image frame or ndarray
            :func:`skrtl.make_image_frame` output (columns ``image``, ``mask``, ``spacing``),
            a file frame from :func:`skrtl.read_cohort`, or an array ``(n, H, W)`` /
            ``(n, D, H, W)`` (then ``missing_mask`` applies).
        y : ignored

        Returns
        -------
        self
        """
        data, mode = self._prepare_fit(X)
        results = []
        for i in range(len(data)):  # first sample that PyRadiomics accepts
            results = self._extract(X, data, mode, rows=[i])
            if results[0] is not None:
                break
        self._set_names(results)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_transform(self, X, y=None):
        """Fit and extract the features of every sample (each sample is processed once).

        Parameters
        ----------
        X : image frame or ndarray
        y : ignored

        Returns
        -------
        ndarray of shape (n_samples, n_features_out_)
        """
        data, mode = self._prepare_fit(X)
        results = self._extract(X, data, mode)
        self._set_names(results)
        return self._with_passthrough(self._to_matrix(results), X, self.feature_names_out_)

    def transform(self, X):
        """Extract the features.

        Parameters
        ----------
        X : image frame or ndarray
            Same form as in :meth:`fit`.

        Returns
        -------
        ndarray of shape (n_samples, n_features_out_)
            NaN rows for failed samples when ``errors="nan"``; the passthrough columns
            follow the features (a DataFrame with ``set_output(transform="pandas")``).
        """
        check_is_fitted(self, "feature_names_out_")
        data, mode, ndim = self._read(X)
        if ndim != self.ndim_:
            raise ValueError(
                f"{type(self).__name__} was fitted on {self.ndim_}-D images but got {ndim}-D "
                "images; use the same kind of input in fit and transform."
            )
        F = self._to_matrix(self._extract(X, data, mode))
        return self._with_passthrough(F, X, self.feature_names_out_)

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """PyRadiomics feature names, e.g. ``original_glcm_Contrast``.

        Parameters
        ----------
        input_features : ignored
            Images have no input feature names.

        Returns
        -------
        ndarray of str
        """
        check_is_fitted(self, "feature_names_out_")
        return np.asarray(list(self.feature_names_out_) + self.passthrough_, dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.transformer_tags.preserves_dtype = []
        tags.requires_fit = True
        return tags
