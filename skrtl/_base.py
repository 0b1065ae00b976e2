"""Shared foundations of skrtl's estimators: image tags, image parameters, the torch network
protocol and the site vocabulary.

Estimators that take images combine, from left to right,

* :class:`ImageEstimatorMixin`: the scikit-learn tags of image input (3-D arrays or image
  frames, no tabular 2-D data) and of image transformers (no dtype is preserved);
* scikit-learn's role mixin (``TransformerMixin``, ``ClassifierMixin``);
* :class:`BaseTorchImageEstimator` for estimators that run a torch network on images: the image
  parameters and their constraints, declared once and merged by subclasses the
  imbalanced-learn way (``{**BaseTorchImageEstimator._parameter_constraints, ...}``), the
  reading of image input and the construction of the one preprocessing path
  (:class:`~skrtl._preprocess.ImagePreprocessor`); or ``BaseEstimator`` for the others.

:class:`TorchNetworkMixin` documents the protocol through which wrappers such as
:class:`~skrtl.AdaBN` reach the network of a fitted estimator.

Site-aware estimators (AdaBN, ComBat, histogram matching, domain adaptation) share one
vocabulary: ``site_column`` names the frame / DataFrame column holding each row's site (``None``
ignores it), the routed metadata ``sample_domain`` overrides it, and ``unseen`` says what
happens to a site that was not seen in ``fit``: ``"error"`` raises, ``"reference"`` treats it as
the reference (source / pooled) site, ``"batch"`` estimates its statistics from its rows in the
batch being transformed (with a :class:`~skrtl.HarmonizationWarning`).

Harmonizers measure whether they made the sites *more* different with one mechanism,
:func:`check_shift_change`: the maximum mean discrepancy between source and target
representations before and after harmonization (:func:`measure_shift`), and a
:class:`HarmonizationWarning` when it grew (``check_shift=True`` of AdaBN, HistogramMatcher and
ComBatHarmonizer; :class:`~skrtl.AutoHarmonizer` uses the same measure).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_array
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils._set_output import _get_output_config
from torch import nn

from ._imaging import ImageInput, read_image_frame
from ._preprocess import INTENSITY_METHODS, VOLUMETRIC_OPTIONS, ImagePreprocessor
from .utils import missing_rows

__all__ = [
    "DEFAULT_SITE_COLUMN",
    "PassthroughMixin",
    "MIN_IMAGE_SIDE",
    "UNSEEN_OPTIONS",
    "BaseTorchImageEstimator",
    "HarmonizationWarning",
    "ImageEstimatorMixin",
    "ShiftChange",
    "TorchNetworkMixin",
    "check_shift_change",
    "measure_shift",
    "resolve_unseen",
    "site_labels",
    "split_site_features",
    "unseen_constraint",
]

#: Smallest image side (pixels) that is resized to a network input.
MIN_IMAGE_SIDE = 8
DEFAULT_SITE_COLUMN = "site"
#: What a site-aware estimator does with a site it did not see in ``fit``.
UNSEEN_OPTIONS = ("error", "reference", "batch")
# earlier names of the same options (accepted with a FutureWarning)
_UNSEEN_ALIASES = {"source": "reference", "pooled": "reference", "fit": "batch"}


class HarmonizationWarning(UserWarning):
    """A harmonizer used a documented fallback, or measurably increased the site shift."""


# --------------------------------------------------------------------------------------------
# tags
# --------------------------------------------------------------------------------------------
class ImageEstimatorMixin:
    """scikit-learn tags of estimators whose input is images (arrays or image frames).

    Put it first among the bases: ``class E(ImageEstimatorMixin, TransformerMixin,
    BaseEstimator)``.
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.requires_fit = True
        if tags.transformer_tags is not None:
            tags.transformer_tags.preserves_dtype = []
        return tags


# --------------------------------------------------------------------------------------------
# the torch network protocol
# --------------------------------------------------------------------------------------------
class TorchNetworkMixin:
    """Protocol of estimators that run a torch network, for wrappers such as AdaBN.

    A fitted estimator implementing it exposes

    ``_skrtl_torch_module()``
        The network (an ``nn.Module``) whose BatchNorm statistics describe the source domain.
        The estimator must own it: a wrapper may change its state.
    ``_skrtl_iter_inputs(X, batch_size=None)``
        Yields ``(x, owners)``: network input batches of ``X`` on the network's device,
        preprocessed exactly as ``transform`` / ``predict`` preprocess them, and the sample
        index of each row of ``x``.
    ``_skrtl_invalidate_cache()``
        Forget anything computed from the network's state (called after that state changed).
    ``_skrtl_network_copy()``
        A copy of the fitted estimator that owns a private copy of its network, so that its
        state can be changed without touching this estimator (AdaBN keeps one per site).

    The defaults below implement the last two; estimators implement the first two.
    """

    def _skrtl_torch_module(self) -> nn.Module:  # pragma: no cover - protocol
        raise NotImplementedError

    def _skrtl_iter_inputs(self, X, batch_size=None) -> Iterator:  # pragma: no cover
        raise NotImplementedError

    def _skrtl_invalidate_cache(self) -> None:
        return None

    def _skrtl_network_copy(self):
        return copy.deepcopy(self)


# --------------------------------------------------------------------------------------------
# torch image estimators
# --------------------------------------------------------------------------------------------
class BaseTorchImageEstimator(TorchNetworkMixin, BaseEstimator):
    """Image parameters, input reading and preprocessing shared by the torch image estimators.

    Subclasses declare every parameter in their own ``__init__`` (scikit-learn reads the
    signature) and merge the constraints: ``_parameter_constraints = {**BaseTorchImageEstimator.
    _parameter_constraints, "own_param": [...]}``. The shared parameters mean the same in every
    estimator:

    ``backbone``, ``weights``, ``pretrained``
        The timm network and its weights (:func:`skrtl.load_backbone`).
    ``mode``, ``slices``, ``n_slices``
        ``"2d"`` images, ``"2.5d"`` planes through the lesion centre, ``"3d"`` volumes.
    ``volumetric``
        How ``mode="3d"`` runs the network: ``"slices"`` (slice-wise 2-D network),
        ``"acs"`` or ``"inflate"`` (a 3-D network converted from the 2-D one,
        :func:`skrtl.convert_to_3d`).
    ``input_size``, ``intensity``, ``windows``, ``percentiles``
        The preprocessing (:mod:`skrtl._preprocess`); ``input_size="auto"`` is the class's
        :attr:`_AUTO_INPUT_SIZE` for images and :attr:`_AUTO_VOLUME_SIZE` for volumetric
        networks.
    ``device``
        ``"auto"``: CUDA when available, else the CPU.
    """

    _parameter_constraints: dict = {
        "backbone": [str],
        "weights": [str, os.PathLike, None],
        "pretrained": ["boolean"],
        "mode": [StrOptions({"2d", "2.5d", "3d"})],
        "volumetric": [StrOptions(set(VOLUMETRIC_OPTIONS))],
        "slices": [StrOptions({"orthogonal", "adjacent"})],
        "n_slices": [Interval(Integral, 1, None, closed="left")],
        "input_size": [
            Interval(Integral, 1, None, closed="left"),
            tuple,
            list,
            StrOptions({"auto"}),
        ],
        "intensity": [StrOptions(set(INTENSITY_METHODS))],
        "windows": [list, tuple, None],
        "percentiles": [tuple, list],
        "device": [str, torch.device],
        "verbose": ["verbose"],
    }

    #: ``input_size="auto"`` for 2-D network images and for volumes of a 3-D network
    _AUTO_INPUT_SIZE = 224
    _AUTO_VOLUME_SIZE = 64

    # ------------------------------------------------------------------ parameters
    @property
    def _volumetric(self) -> bool:
        """Whether this estimator runs a 3-D network on whole volumes."""
        return self.mode == "3d" and getattr(self, "volumetric", "slices") != "slices"

    def _check_volume_size(self) -> tuple[int, int, int]:
        size = self.input_size
        if isinstance(size, str) and size == "auto":
            size = self._AUTO_VOLUME_SIZE
        if isinstance(size, Integral) and not isinstance(size, bool):
            return (int(size),) * 3
        size = tuple(size)
        if len(size) != 3 or not all(
            isinstance(s, Integral) and not isinstance(s, bool) and s > 0 for s in size
        ):
            raise ValueError(
                f"input_size must be a positive int or a triple (depth, height, width) for "
                f"volumetric={self.volumetric!r}, got {self.input_size!r}."
            )
        return tuple(int(s) for s in size)

    def _check_image_params(self) -> tuple[tuple[int, ...], list | None]:
        """Validated ``(input size (h, w) or (d, h, w), CT windows or None)``."""
        size = self.input_size
        volumetric = getattr(self, "volumetric", "slices")
        if volumetric != "slices" and self.mode != "3d":
            raise ValueError(
                f"volumetric={volumetric!r} runs a 3-D network on volumes and needs "
                f"mode='3d', got mode={self.mode!r}; use mode='3d' or volumetric='slices'."
            )
        if self._volumetric:
            size = self._check_volume_size()
        elif isinstance(size, str) and size == "auto":
            size = (int(self._AUTO_INPUT_SIZE),) * 2
        elif isinstance(size, Integral):
            size = (int(size), int(size))
        else:
            size = tuple(size)
            if len(size) != 2 or not all(
                isinstance(s, Integral) and not isinstance(s, bool) and s > 0 for s in size
            ):
                raise ValueError(
                    f"input_size must be a positive int or a pair (height, width), got "
                    f"{self.input_size!r}."
                )
            size = (int(size[0]), int(size[1]))
        windows = None
        if self.windows is not None:
            try:
                windows = [(float(lv), float(wd)) for lv, wd in self.windows]
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    "windows must be a list of (level, width) pairs in HU, e.g. "
                    f"[(40, 400), (-600, 1500)]; got {self.windows!r}."
                ) from exc
            if not windows or any(wd <= 0 for _, wd in windows):
                raise ValueError(
                    f"windows must be a non-empty list of (level, width) with width > 0, got "
                    f"{self.windows!r}."
                )
        if self.intensity == "window" and windows is None:
            raise ValueError(
                "intensity='window' needs windows=[(level, width), ...], e.g. [(40, 400)]."
            )
        if windows is not None and self.intensity not in ("auto", "window"):
            raise ValueError(
                f"windows are given but intensity={self.intensity!r}; use intensity='window' "
                "(or 'auto') with windows, or drop windows."
            )
        p = tuple(self.percentiles)
        if len(p) != 2 or not (0 <= p[0] < p[1] <= 100):
            raise ValueError(
                f"percentiles must be (low, high) with 0 <= low < high <= 100, got "
                f"{self.percentiles!r}."
            )
        if self.mode == "2.5d" and self.slices == "orthogonal" and windows and len(windows) > 1:
            raise ValueError(
                "mode='2.5d' with slices='orthogonal' stacks three planes as channels and "
                f"needs one intensity channel, got {len(windows)} windows; use one window or "
                "slices='adjacent'."
            )
        return size, windows

    # ------------------------------------------------------------------ input
    def _read(self, X) -> ImageInput:
        """Validated image input; images smaller than :data:`MIN_IMAGE_SIDE` are refused.

        A file frame (:func:`skrtl.read_cohort`) is read lazily: the checks here use the file
        headers, and each case is loaded when the preprocessing reaches it.
        """
        data = read_image_frame(X, mode=self.mode, estimator_name=type(self).__name__)
        for i in range(len(data)):
            shape = data.shape(i)
            spatial = shape[:2] if self.mode == "2d" else shape[1:]
            if min(spatial) < MIN_IMAGE_SIDE:
                raise ValueError(
                    f"{data.case_name(i)} has spatial shape {tuple(shape)!r}: sides below "
                    f"{MIN_IMAGE_SIDE} px cannot be resized meaningfully to "
                    f"input_size={self.input_size!r}. Crop larger regions or drop the sample."
                )
        return data

    def _intensity_channels(self, windows, data: ImageInput) -> int:
        """Channels of one network image before replication to the network's channels."""
        if self.mode == "2.5d":
            if self.slices == "orthogonal":
                return 3
            return self.n_slices * (len(windows) if windows else 1)
        if windows:
            return len(windows)
        chans = set()
        for i in range(len(data)):
            shape = data.shape(i)
            chans.add(int(shape[2]) if (self.mode == "2d" and len(shape) == 3) else 1)
        if len(chans) != 1:
            raise ValueError(
                f"{type(self).__name__}: the images have different numbers of channels "
                f"{sorted(chans)!r}; give all images the same channels (grey or RGB)."
            )
        return chans.pop()

    @staticmethod
    def _network_in_chans(n_channels: int) -> int:
        """Network input channels: 3 for grey or RGB images (grey is replicated), else as is."""
        return 3 if n_channels in (1, 3) else int(n_channels)

    def _make_preprocessor(
        self, *, size, windows, in_chans: int, mean, std, slice_selection: str = "mask"
    ) -> ImagePreprocessor:
        volumetric = getattr(self, "volumetric", "slices") if self.mode == "3d" else "slices"
        return ImagePreprocessor(
            mode=self.mode,
            intensity=self.intensity,
            windows=tuple(tuple(w) for w in windows) if windows else None,
            percentiles=tuple(float(p) for p in self.percentiles),
            slices=self.slices,
            n_slices=int(self.n_slices),
            slice_selection=slice_selection,
            size=tuple(size),
            in_chans=int(in_chans),
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            volumetric=volumetric,
        )

    def _check_min_size(self, size, min_size: int) -> None:
        if min(size) < min_size:
            raise ValueError(
                f"input_size={self.input_size!r} is smaller than the minimum {min_size} px that "
                f"{self.backbone!r} accepts (its total stride); use input_size >= {min_size} "
                "(224 is the pretraining size)."
            )


# --------------------------------------------------------------------------------------------
# frame columns passed through feature extractors
# --------------------------------------------------------------------------------------------
class PassthroughMixin:
    """``passthrough``: frame columns (site, clinical covariates) appended to the features.

    A feature extractor of images (CNN or radiomics features) reads an image frame and
    returns a feature matrix; the frame's other columns would be lost. With
    ``passthrough=["site", "age"]`` they are appended, unchanged, after the features, so that
    the next Pipeline step sees them: :class:`~skrtl.ComBatHarmonizer` reads its ``site``
    column, clinical covariates reach the model. Non-numeric columns need a DataFrame
    output (``set_output(transform="pandas")``); a numeric array cannot hold them.

    The estimator defines ``passthrough`` and calls :meth:`_fit_passthrough` in ``fit`` and
    :meth:`_with_passthrough` at the end of ``transform``.
    """

    def _passthrough_columns(self) -> list[str]:
        cols = self.passthrough
        if cols is None:
            return []
        if isinstance(cols, str):
            cols = [cols]
        cols = list(cols)
        if not all(isinstance(c, str) for c in cols):
            raise ValueError(
                f"passthrough must be None, a column name or a list of column names, got "
                f"{self.passthrough!r}."
            )
        if len(set(cols)) != len(cols):
            raise ValueError(f"passthrough has duplicate columns: {self.passthrough!r}.")
        return cols

    def _check_passthrough_input(self, X, cols: list[str]) -> None:
        name = type(self).__name__
        if not isinstance(X, pd.DataFrame):
            raise ValueError(
                f"{name}(passthrough={self.passthrough!r}) needs an image frame (DataFrame) "
                f"that holds those columns, got {type(X).__name__}."
            )
        missing = [c for c in cols if c not in X.columns]
        if missing:
            raise ValueError(
                f"{name}: passthrough columns {missing!r} are not in the image frame (columns: "
                f"{list(X.columns)!r})."
            )
        if _get_output_config("transform", self)["dense"] != "pandas":
            bad = [c for c in cols if not _is_numeric(X[c])]
            if bad:
                raise ValueError(
                    f"{name}: passthrough column(s) {bad!r} are not numeric (dtype "
                    f"{X[bad[0]].dtype}), so a numeric feature array cannot hold them. Call "
                    f"set_output(transform='pandas') on {name} or on the whole Pipeline to get "
                    "a DataFrame, or pass only numeric columns."
                )

    def _fit_passthrough(self, X) -> None:
        cols = self._passthrough_columns()
        if cols:
            self._check_passthrough_input(X, cols)
        self.passthrough_ = cols

    def _with_passthrough(self, F: np.ndarray, X, feature_names):
        """The features ``F``, followed by the passthrough columns of ``X``."""
        cols = getattr(self, "passthrough_", [])
        if not cols:
            return F
        self._check_passthrough_input(X, cols)
        if _get_output_config("transform", self)["dense"] == "pandas":
            out = pd.DataFrame(F, columns=list(feature_names), index=X.index)
            for c in cols:
                out[c] = X[c].to_numpy()
            return out
        extra = X[cols].to_numpy(dtype=np.float64)
        return np.hstack([F.astype(np.float64), extra])


def _is_numeric(col: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_complex_dtype(col)


# --------------------------------------------------------------------------------------------
# site vocabulary
# --------------------------------------------------------------------------------------------
def unseen_constraint() -> list:
    """The ``_parameter_constraints`` entry of ``unseen`` (earlier option names deprecated)."""
    options = set(UNSEEN_OPTIONS) | set(_UNSEEN_ALIASES)
    return [StrOptions(options, deprecated=set(_UNSEEN_ALIASES))]


def resolve_unseen(value: str, estimator_name: str) -> str:
    """The current name of an ``unseen`` option (earlier names give a FutureWarning)."""
    if value in _UNSEEN_ALIASES:
        new = _UNSEEN_ALIASES[value]
        warnings.warn(
            f"{estimator_name}(unseen={value!r}) is deprecated; use unseen={new!r} (the same "
            f"behaviour). Options: {UNSEEN_OPTIONS!r}.",
            FutureWarning,
            stacklevel=3,
        )
        return new
    return value


def site_labels(X, *, site_column, sample_domain=None, name: str = "estimator"):
    """Site label (str) of every row: routed ``sample_domain``, else the site column, else None.

    Parameters
    ----------
    X : DataFrame, ndarray or image input
    site_column : str or None
        Column of a DataFrame ``X`` holding the sites; ``None`` ignores any site column.
    sample_domain : array-like of shape (n_samples,), optional
        Routed site / domain labels; they take precedence over the column.
    name : str
        Estimator name for error messages.

    Returns
    -------
    ndarray of object (str) of shape (n_samples,), or None

    Raises
    ------
    ValueError
        On a label count that differs from the rows of ``X``, or a missing (NaN / None)
        label: every row needs a site.
    """
    n = len(X) if hasattr(X, "__len__") else np.asarray(X).shape[0]
    if sample_domain is not None:
        raw = np.asarray(sample_domain, dtype=object)
        if raw.ndim != 1 or raw.shape[0] != n:
            raise ValueError(
                f"{name}: sample_domain must have shape ({n},) (one site per row of X), got "
                f"{np.shape(sample_domain)!r}."
            )
        source = "sample_domain"
    elif site_column is not None and isinstance(X, pd.DataFrame) and site_column in X.columns:
        raw = X[site_column].to_numpy(dtype=object)
        source = f"column {site_column!r}"
    else:
        return None
    rows = missing_rows(raw)
    if rows.size:
        raise ValueError(
            f"{name}: the site labels ({source}) are missing (NaN / None) for {rows.size} rows "
            f"(first rows {rows[:5].tolist()!r}); every row needs a site. Label them (e.g. "
            "'unknown' as its own site) or drop them."
        )
    return np.asarray([str(v) for v in raw], dtype=object)


# --------------------------------------------------------------------------------------------
# did a harmonizer increase the shift?
# --------------------------------------------------------------------------------------------
#: Rows of each side used to measure a shift (random subsample beyond it).
SHIFT_CHECK_ROWS = 200


def measure_shift(
    X_source,
    X_target,
    *,
    max_samples: int = SHIFT_CHECK_ROWS,
    n_permutations: int = 200,
    random_state=0,
) -> tuple[float, float, float]:
    """Source-target discrepancy of two feature matrices: squared MMD, p-value, null spread.

    The unbiased squared maximum mean discrepancy of :func:`skrtl.mmd_test` (RBF kernel with
    the median bandwidth, features standardised by the pooled mean and standard deviation, so
    the measure does not depend on the units of the representation) on at most
    ``max_samples`` rows of each side, and its permutation p-value.

    Parameters
    ----------
    X_source, X_target : array-like of shape (n, n_features)
    max_samples : int, default=200
    n_permutations : int, default=200
    random_state : int, RandomState instance or None, default=0

    Returns
    -------
    mmd2 : float
        About 0 for indistinguishable sets (slightly negative values are chance).
    p_value : float
    null_sd : float
        Standard deviation of the squared MMD under the permutation null (its noise level).
    """
    from ._diagnostics import mmd_test  # the diagnostics build on this module

    res = mmd_test(
        X_source,
        X_target,
        max_samples=max_samples,
        n_permutations=n_permutations,
        random_state=random_state,
    )
    return float(res.statistic), float(res.p_value), float(np.std(res.null_distribution))


@dataclass(frozen=True)
class ShiftChange:
    """The source-target discrepancy before and after a harmonizer (:func:`check_shift_change`).

    Attributes
    ----------
    what : str
        The pair of domains compared (e.g. ``"site 'B' vs the source"``).
    mmd_before, mmd_after : float
        Squared MMD of the unharmonized and of the harmonized representations.
    p_before, p_after : float
        Their permutation p-values.
    increased : bool
        The harmonized representations differ significantly (``p_after < alpha``), by more
        than ``(1 + tolerance)`` times the unharmonized ones and by more than twice the
        permutation noise of the squared MMD.
    """

    what: str
    mmd_before: float
    mmd_after: float
    p_before: float
    p_after: float
    increased: bool


def check_shift_change(
    before,
    after,
    *,
    name: str,
    what: str = "the target",
    what_reference: str = "the reference",
    tolerance: float = 0.1,
    alpha: float = 0.05,
    random_state=0,
    warn: bool = True,
    stacklevel: int = 3,
) -> ShiftChange:
    """Measure the source-target discrepancy before and after harmonization; warn if it grew.

    The one mechanism by which skrtl's harmonizers (``check_shift=True``) say that they made a
    domain *more* different from the reference: :func:`measure_shift` of the ``(source,
    target)`` representations before and after, on the same rows, and a
    :class:`HarmonizationWarning` when the shift increased.

    Parameters
    ----------
    before, after : (array-like, array-like)
        ``(source rows, target rows)`` of the unharmonized and harmonized representations
        (features, network outputs or image descriptors), the same rows in the same order.
    name : str
        The harmonizer, for the message.
    what : str, default="the target"
        The domain compared with the reference, for the message.
    what_reference : str, default="the reference"
        The reference domain, for the message.
    tolerance : float, default=0.1
        Relative increase of the squared MMD tolerated before warning.
    alpha : float, default=0.05
        The harmonized shift must also be significant at this level.
    random_state : int, RandomState instance or None, default=0
    warn : bool, default=True
        Issue the warning (else only return the measurement).
    stacklevel : int, default=3

    Returns
    -------
    ShiftChange
        With fewer than 2 rows on either side the shift cannot be measured: the values are
        NaN and ``increased`` is False (the harmonizers warn about so few images anyway).
    """
    if min(len(before[0]), len(before[1]), len(after[0]), len(after[1])) < 2:
        nan = float("nan")
        return ShiftChange(
            what=what, mmd_before=nan, mmd_after=nan, p_before=nan, p_after=nan, increased=False
        )
    mb, pb, _ = measure_shift(*before, random_state=random_state)
    ma, pa, noise = measure_shift(*after, random_state=random_state)
    increased = bool(
        pa < alpha and ma > mb + max(tolerance * max(mb, 0.0), 2.0 * noise) and ma > 0
    )
    if increased and warn:
        warnings.warn(
            f"{name} increased the measured discrepancy between {what} and {what_reference} "
            f"(squared MMD {mb:.3g} -> {ma:.3g}, p = {pa:.3g}): the harmonized data may be "
            "worse than the unharmonized data. Check on a few labelled cases of that site, or "
            "let skrtl.AutoHarmonizer choose a harmonizer from unlabelled target images.",
            HarmonizationWarning,
            stacklevel=stacklevel,
        )
    return ShiftChange(
        what=what,
        mmd_before=mb,
        mmd_after=ma,
        p_before=pb,
        p_after=pa,
        increased=increased,
    )


def _check_finite_features(X: np.ndarray, names: list[str], estimator_name: str) -> None:
    """Raise naming the first rows and columns of NaN / infinite features."""
    bad = ~np.isfinite(X)
    if bad.any():
        rows, cols = np.nonzero(bad)
        where = ", ".join(f"row {r} column {names[c]!r}" for r, c in list(zip(rows, cols))[:5])
        raise ValueError(
            f"{estimator_name}: the features contain {int(bad.sum())} NaN or infinite values "
            f"({where}{', ...' if bad.sum() > 5 else ''}). Impute them first (e.g. "
            "sklearn.impute.SimpleImputer before this step) or drop those rows or columns."
        )


def split_site_features(
    est,
    X,
    *,
    sample_domain=None,
    fitting: bool,
    exclude=(),
    what: str = "every column except the site column",
):
    """Features, site labels and feature names of a site-aware step on tabular features.

    A DataFrame ``X`` gives its ``est.site_column`` column as the sites (dropped from the
    features) and may hold ``exclude`` columns (e.g. covariates, also dropped); an array is all
    features. ``sample_domain`` (routed) overrides the column and must agree with it when both
    are given. With ``fitting`` the input columns are recorded on ``est``
    (``feature_names_in_``, ``n_features_in_``, ``_n_feature_columns_``); otherwise they are
    checked against them.

    Returns
    -------
    X_features : ndarray of float64, shape (n_samples, n_features)
    sites : ndarray of str or None
    feature_names : list of str
    """
    name = type(est).__name__
    col = est.site_column
    if isinstance(X, pd.DataFrame):
        names = [str(c) for c in X.columns]
        if fitting:
            est.feature_names_in_ = np.asarray(names, dtype=object)
            est.n_features_in_ = len(names)
        elif hasattr(est, "feature_names_in_") and names != list(est.feature_names_in_):
            raise ValueError(
                f"{name}: the columns of X differ from those seen in fit ({names[:6]!r}... vs "
                f"{list(est.feature_names_in_)[:6]!r}...). Pass the same columns, in the same "
                "order."
            )
        missing = [c for c in exclude if c not in X.columns]
        if missing:
            raise ValueError(
                f"{name}: columns {missing!r} are not in X (columns: {names[:8]!r}...). Add "
                "them to X or drop them from the parameters."
            )
        drop = list(exclude) + ([col] if col is not None and col in X.columns else [])
        feats = X.drop(columns=drop)
        bad = [
            c
            for c in feats.columns
            if not pd.api.types.is_numeric_dtype(feats[c]) or pd.api.types.is_bool_dtype(feats[c])
        ]
        if bad:
            raise ValueError(
                f"{name}: columns {bad[:5]!r} of X are not numeric features. {name} uses {what} "
                f"(site_column={col!r}) as features; drop the others or declare them."
            )
        feature_names = [str(c) for c in feats.columns]
        values = feats.to_numpy(dtype=np.float64)
    else:
        if exclude:
            raise ValueError(
                f"{name}: {list(exclude)!r} name DataFrame columns but X is an array; pass a "
                "DataFrame (or route the values as metadata)."
            )
        values = check_array(X, dtype=np.float64, ensure_all_finite=False)
        if fitting:
            est.n_features_in_ = values.shape[1]
            if hasattr(est, "feature_names_in_"):
                del est.feature_names_in_
        feature_names = [f"x{i}" for i in range(values.shape[1])]
    _check_finite_features(values, feature_names, name)
    Xf = check_array(values, dtype=np.float64, ensure_min_samples=1)
    if fitting:
        est._n_feature_columns_ = Xf.shape[1]
    elif Xf.shape[1] != getattr(est, "_n_feature_columns_", Xf.shape[1]):
        raise ValueError(
            f"X has {Xf.shape[1]} features, but {name} is expecting "
            f"{est._n_feature_columns_} features as input."
        )
    sites = site_labels(X, site_column=col, sample_domain=sample_domain, name=name)
    if sample_domain is not None and isinstance(X, pd.DataFrame) and col in X.columns:
        own = site_labels(X, site_column=col, name=name)
        if not np.array_equal(own, sites):
            raise ValueError(
                f"{name}: sample_domain disagrees with X[{col!r}]; give the sites once (either "
                "the column or sample_domain)."
            )
    return Xf, sites, feature_names
