"""Feature-level domain adaptation with skada, on skrtl features and skrtl site labels.

`skada <https://scikit-adaptation.github.io/>`_ implements the classic unsupervised
domain-adaptation methods on feature matrices: mapping adapters (CORAL, subspace alignment,
optimal-transport mappings, transfer component analysis, ...) that move the source features onto
the target distribution, and reweighting adapters (kernel density, KMM, KLIEP, discriminator,
...) that weight the source samples like the target. skada encodes domains as integers
(``sample_domain >= 0`` source, ``< 0`` target), marks target rows as unlabelled (``y = -1``) and
needs scikit-learn's metadata routing. This module is the bridge:

* :class:`DomainAdapter` wraps a mapping adapter as a plain transformer for a
  :class:`~sklearn.pipeline.Pipeline`, next to :class:`~skrtl.ComBatHarmonizer`: the sites come
  from the ``site`` column of a feature DataFrame (a CNN feature transformer passes it through
  with ``set_output(transform="pandas")``) or from a routed ``sample_domain`` of site labels,
  and every source site is aligned onto the target site(s);
* :class:`SiteDAPipeline` (built by :func:`make_site_da_pipeline`) wraps a whole skada pipeline
  (adapter + estimator) as one estimator, so that unlabelled target rows can be part of ``X``
  (they are kept out of the estimator's fit) and reweighting adapters can hand their sample
  weights to the estimator.

Both decide which rows are the target the same way: the sites listed in ``target_sites``, or
else the sites whose rows all have an unknown label (``NaN`` / ``None``, or ``-1`` in integer
labels, the convention of scikit-learn's semi-supervised estimators and of skada). skada is
imported lazily and without its import-time side effect (it switches metadata routing on
globally); skrtl turns routing on only around its own calls into skada.
"""

from __future__ import annotations

import warnings
from numbers import Integral

import numpy as np
import pandas as pd
import sklearn
from sklearn.base import BaseEstimator, MetaEstimatorMixin, TransformerMixin, clone
from sklearn.metrics import accuracy_score, r2_score
from sklearn.utils import get_tags
from sklearn.utils._param_validation import HasMethods, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

from ._base import (
    SHIFT_CHECK_ROWS,
    HarmonizationWarning,
    check_shift_change,
    split_site_features,
)

__all__ = [
    "DA_ADAPTERS",
    "DomainAdapter",
    "SiteDAPipeline",
    "import_skada",
    "make_site_da_pipeline",
]

# short names for skada's adapters: (skada class name, kind, constructor parameters); "mapping"
# adapters change the features, "reweight" adapters only weight the source samples
DA_ADAPTERS: dict[str, tuple[str, str, dict]] = {
    "coral": ("CORALAdapter", "mapping", {}),
    "subspace_alignment": ("SubspaceAlignmentAdapter", "mapping", {}),
    "tca": ("TransferComponentAnalysisAdapter", "mapping", {}),
    "ot_mapping": ("OTMappingAdapter", "mapping", {}),
    "entropic_ot_mapping": ("EntropicOTMappingAdapter", "mapping", {}),
    "linear_ot_mapping": ("LinearOTMappingAdapter", "mapping", {}),
    "class_regularizer_ot_mapping": ("ClassRegularizerOTMappingAdapter", "mapping", {}),
    "density_reweight": ("DensityReweightAdapter", "reweight", {}),
    "gaussian_reweight": ("GaussianReweightAdapter", "reweight", {}),
    "discriminator_reweight": ("DiscriminatorReweightAdapter", "reweight", {}),
    "kliep": ("KLIEPReweightAdapter", "reweight", {"gamma": "scale"}),
    "kmm": ("KMMReweightAdapter", "reweight", {}),
    "nearest_neighbor_reweight": ("NearestNeighborReweightAdapter", "reweight", {}),
}

_UNSEEN = {"error", "reference", "batch"}


def import_skada():
    """Import and return the ``skada`` package without changing sklearn's global config.

    ``import skada`` calls ``sklearn.set_config(enable_metadata_routing=True)``; this function
    imports it inside :func:`sklearn.config_context`, which restores the previous setting.
    Importing skada yourself first is fine too (skrtl works with routing on or off).

    Returns
    -------
    module
        The ``skada`` package.

    Raises
    ------
    ImportError
        When skada is not installed (``pip install skada``).
    """
    try:
        with sklearn.config_context():
            import skada
    except ImportError as exc:  # pragma: no cover - skada is a dependency
        raise ImportError(
            "feature-level domain adaptation needs the 'skada' package: pip install skada"
        ) from exc
    return skada


def _resolve_adapter(adapter, *, name: str = "adapter"):
    """A skada adapter instance from an instance or a short name of DA_ADAPTERS."""
    skada = import_skada()
    if isinstance(adapter, str):
        if adapter not in DA_ADAPTERS:
            raise ValueError(
                f"{name}={adapter!r} is not a known skada adapter name; use one of "
                f"{sorted(DA_ADAPTERS)!r} or pass an adapter instance, e.g. "
                "skada.CORALAdapter(reg=0.1)."
            )
        cls_name, _, params = DA_ADAPTERS[adapter]
        return getattr(skada, cls_name)(**params)
    if not isinstance(adapter, skada.BaseAdapter):
        raise TypeError(
            f"{name} must be a skada adapter (e.g. skada.CORALAdapter()) or one of the names "
            f"{sorted(DA_ADAPTERS)!r}, got {adapter!r}."
        )
    return adapter


def _is_reweighter(adapter) -> bool:
    return hasattr(adapter, "compute_weights")


# --------------------------------------------------------------------------------------------
# site labels, target rows and skada's domain codes
# --------------------------------------------------------------------------------------------
def _split_sites(est, X, sample_domain, *, fitting: bool):
    """Return (features float64 array, site labels as str, feature names)."""
    Xf, sites, feature_names = split_site_features(
        est, X, sample_domain=sample_domain, fitting=fitting
    )
    if sites is None:
        col = est.site_column
        raise ValueError(
            f"{type(est).__name__} needs the site of every row: pass a DataFrame X with a "
            f"{col!r} column (site_column={col!r}) or route sample_domain=<site labels> "
            "(metadata routing)."
        )
    return Xf, sites, feature_names


def _unlabelled(y, *, regression: bool) -> np.ndarray:
    """Rows whose label is unknown: NaN / None, or -1 in integer classification labels."""
    arr = np.asarray(y)
    mask = np.asarray(pd.isna(arr), dtype=bool)
    if not regression and np.issubdtype(arr.dtype, np.integer):
        mask |= arr == -1
    return mask


def _check_target_sites(target_sites):
    if target_sites is None:
        return None
    if isinstance(target_sites, str | Integral) and not isinstance(target_sites, bool):
        return [str(target_sites)]
    try:
        out = [str(s) for s in target_sites]
    except TypeError:
        raise ValueError(
            f"target_sites must be None, a site label or a list of site labels, got "
            f"{target_sites!r}."
        ) from None
    if not out:
        raise ValueError("target_sites is empty; pass None (targets = unlabelled sites) or sites.")
    return out


def _decide_targets(sites, unlabelled, target_sites, name: str):
    """Return (source sites, target sites), both sorted lists of str."""
    present = sorted(set(sites.tolist()))
    wanted = _check_target_sites(target_sites)
    if wanted is not None:
        missing = [s for s in wanted if s not in present]
        if missing:
            raise ValueError(
                f"target_sites {missing!r} are not sites of X (sites in X: {present!r}). Check "
                "the spelling, or that the rows of that site are in the training data."
            )
        targets = sorted(set(wanted))
        orphan = sorted(set(sites[unlabelled].tolist()) - set(targets))
        if orphan:
            raise ValueError(
                f"rows of sites {orphan!r} have no label (NaN / None / -1) but those sites are "
                f"not in target_sites={wanted!r}. Label them, drop them, or list those sites in "
                "target_sites."
            )
    else:
        targets = []
        for s in present:
            rows = sites == s
            k = int(unlabelled[rows].sum())
            if k == rows.sum():
                targets.append(s)
            elif k:
                raise ValueError(
                    f"site {s!r} has {k} of {int(rows.sum())} rows without a label; a site is "
                    "either a source (all rows labelled) or a target (no row labelled). Label "
                    "or drop those rows, or name the target sites with target_sites=[...]."
                )
    if not targets:
        raise ValueError(
            f"{name} found no target site in X (sites: {present!r}). Name them with "
            "target_sites=[...], or give the target rows an unknown label (NaN, or -1 for "
            "integer labels) in y."
        )
    sources = [s for s in present if s not in targets]
    if not sources:
        raise ValueError(
            f"every site of X is a target ({targets!r}); domain adaptation needs at least one "
            "labelled source site."
        )
    return sources, targets


def _codes(sites, code_of: dict[str, int]) -> np.ndarray:
    return np.array([code_of[s] for s in sites], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# DomainAdapter
# --------------------------------------------------------------------------------------------
class DomainAdapter(TransformerMixin, BaseEstimator):
    """A skada mapping adapter as a transformer on skrtl features and site labels.

    Learns, in ``fit``, a map from each source site onto the target site(s) with a skada
    adapter (CORAL, subspace alignment, optimal-transport mapping, ...), and applies it in
    ``transform`` to the rows of each site: source rows are mapped onto the target
    distribution, target rows go through the adapter's target side (e.g. centred for CORAL).
    Use it in a plain :class:`~sklearn.pipeline.Pipeline` where ComBat would go, e.g. to align
    every scanner onto a reference scanner (``target_sites=["reference site"]``): all training
    rows keep their labels, so the next estimator is fitted on all of them. When the target
    rows are unlabelled, or the adapter reweights samples, use :func:`make_site_da_pipeline`.

    Site labels come from the ``site_column`` of a DataFrame ``X`` (dropped from the output) or
    from ``sample_domain`` (metadata routing, skada's name; request it with
    ``set_fit_request(sample_domain=True).set_transform_request(sample_domain=True)``).

    Parameters
    ----------
    adapter : skada adapter or str, default="coral"
        A skada mapping adapter instance (e.g. ``skada.CORALAdapter(reg=0.1)``,
        ``skada.SubspaceAlignmentAdapter(n_components=10)``) or a short name of
        :data:`DA_ADAPTERS` with kind ``"mapping"`` (``"coral"``, ``"subspace_alignment"``,
        ``"tca"``, ``"ot_mapping"``, ``"entropic_ot_mapping"``, ``"linear_ot_mapping"``, ...).
        It is cloned in ``fit``. Reweighting adapters are refused (their sample weights cannot
        leave a transformer).
    site_column : str or None, default="site"
        Column of a DataFrame ``X`` with the site of each row. ``None``: use ``sample_domain``.
    target_sites : str, list of str or None, default=None
        The target (reference) sites. ``None``: the sites whose rows all have an unknown
        label in ``y`` (``NaN`` / ``None``, or ``-1`` for integer labels).
    per_site : bool, default=True
        Fit one adapter per source site (each site aligned onto the target on its own, like a
        per-site harmonization). ``False``: one adapter for all source sites together (skada's
        multi-source behaviour).
    unseen : {"error", "reference", "batch"}, default="error"
        What ``transform`` does with a site seen in ``fit`` neither as source nor as target:
        ``"error"`` raises; ``"reference"`` passes its rows through the target side (no
        site-specific map); ``"batch"`` aligns that site onto the stored target rows with a new
        adapter fitted on its rows in the transformed batch (at least 2 rows; issues a
        :class:`~skrtl.HarmonizationWarning`).
    check_shift : bool, default=True
        After fitting, measure for every source site the discrepancy between its rows and the
        target rows (squared MMD, at most 200 random rows of each side) before and after the
        mapping, and issue a :class:`~skrtl.HarmonizationWarning` when the mapping *increased*
        it (:func:`skrtl._base.check_shift_change`; ``shift_changes_``).

    Attributes
    ----------
    adapters_ : dict
        Fitted adapter per source site (``per_site=True``) or ``{"*": adapter}``.
    source_sites_, target_sites_ : list of str
        Sites aligned onto the target, and the target sites.
    n_features_in_ : int
        Number of columns of ``X`` in ``fit`` (site column included for a DataFrame).
    feature_names_in_ : ndarray of str
        Only for DataFrame input.
    n_features_out_ : int
    shift_changes_ : dict
        ``check_shift=True``: source site -> :class:`skrtl._base.ShiftChange`.

    See Also
    --------
    make_site_da_pipeline : adapter and estimator with unlabelled target rows.
    ComBatHarmonizer : empirical-Bayes location / scale per site.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> X = pd.DataFrame(rng.normal(size=(60, 3)), columns=["f1", "f2", "f3"])
    >>> X["site"] = np.repeat(["A", "B"], 30)
    >>> X.loc[X.site == "B", ["f1", "f2", "f3"]] *= 3.0
    >>> Xa = DomainAdapter("coral", target_sites="B").fit_transform(X)
    >>> Xa.shape
    (60, 3)
    """

    _parameter_constraints: dict = {
        "adapter": [str, HasMethods(["fit_transform"])],
        "site_column": [str, Integral, None],
        "target_sites": [str, Integral, list, tuple, np.ndarray, None],
        "per_site": ["boolean"],
        "unseen": [StrOptions(_UNSEEN)],
        "check_shift": ["boolean"],
    }

    __metadata_request__fit = {"sample_domain": True}
    __metadata_request__transform = {"sample_domain": True}

    def __init__(
        self,
        adapter="coral",
        *,
        site_column="site",
        target_sites=None,
        per_site=True,
        unseen="error",
        check_shift=True,
    ):
        self.adapter = adapter
        self.site_column = site_column
        self.target_sites = target_sites
        self.per_site = per_site
        self.unseen = unseen
        self.check_shift = check_shift

    # ----------------------------------------------------------------------------------------
    def _labels_for_adapter(self, y, unlabelled):
        """y encoded for skada: integer classes with -1 for targets, or float with NaN."""
        if y is None:
            return None
        arr = np.asarray(y)
        if np.issubdtype(arr.dtype, np.floating):
            out = arr.astype(np.float64).copy()
            out[unlabelled] = np.nan
            return out
        out = np.full(arr.shape[0], -1, dtype=np.int64)
        labelled = ~unlabelled
        if labelled.any():
            _, inv = np.unique(arr[labelled].astype(str), return_inverse=True)
            out[labelled] = inv
        return out

    def _fit_one(self, base, Xs, ys, Xt, yt):
        est = clone(base)
        X = np.vstack([Xs, Xt])
        sd = np.r_[np.ones(len(Xs), dtype=np.int64), -np.ones(len(Xt), dtype=np.int64)]
        y = None if ys is None else np.r_[ys, yt]
        with sklearn.config_context(enable_metadata_routing=True):
            out = est.fit_transform(X, y, sample_domain=sd)
        if not isinstance(out, np.ndarray):
            raise TypeError(
                f"{type(base).__name__}.fit_transform returned {type(out).__name__}, not a "
                "feature array: it is not a mapping adapter. Use make_site_da_pipeline(adapter, "
                "estimator) for reweighting or label-propagation adapters."
            )
        return est, out.shape[1]

    def fit(self, X, y=None, *, sample_domain=None):
        """Fit one adapter per source site (or one for all) onto the target rows.

        Parameters
        ----------
        X : DataFrame or array-like of shape (n_samples, n_features)
            Features, plus the site column for a DataFrame.
        y : array-like of shape (n_samples,), optional
            Labels; unknown labels (``NaN``, ``None``, ``-1`` for integers) mark target rows
            when ``target_sites`` is None. Label-aware adapters (class-regularized OT) use the
            source labels.
        sample_domain : array-like of shape (n_samples,), optional
            Site label of each row (metadata routing), instead of ``X[site_column]``.

        Returns
        -------
        self
        """
        self._validate_params()
        base = _resolve_adapter(self.adapter)
        if _is_reweighter(base):
            raise TypeError(
                f"{type(base).__name__} is a reweighting adapter: it yields sample weights for "
                "the estimator, which a transformer step cannot pass on. Use "
                "skrtl.make_site_da_pipeline(adapter, estimator) instead."
            )
        Xf, sites, names = _split_sites(self, X, sample_domain, fitting=True)
        self._feature_names_ = names
        if y is not None:
            y = np.asarray(y)
            if y.shape[0] != Xf.shape[0]:
                raise ValueError(f"y has {y.shape[0]} rows but X has {Xf.shape[0]}.")
            unl = _unlabelled(y, regression=np.issubdtype(y.dtype, np.floating))
        else:
            unl = np.zeros(Xf.shape[0], dtype=bool)
        sources, targets = _decide_targets(sites, unl, self.target_sites, type(self).__name__)
        if unl.any():
            warnings.warn(
                f"DomainAdapter got {int(unl.sum())} rows without a label (target sites "
                f"{targets!r}). In a plain Pipeline the next estimator is fitted on those rows "
                "too; use skrtl.make_site_da_pipeline to keep unlabelled rows out of its fit.",
                UserWarning,
                stacklevel=2,
            )
        is_t = np.isin(sites, targets)
        # target labels are never shown to the adapter, even when y holds them
        yl = self._labels_for_adapter(y, unl | is_t)
        Xt = Xf[is_t]
        yt = None if yl is None else yl[is_t]
        self.adapters_ = {}
        if self.per_site:
            for s in sources:
                rows = sites == s
                ys = None if yl is None else yl[rows]
                self.adapters_[s], n_out = self._fit_one(base, Xf[rows], ys, Xt, yt)
        else:
            est = clone(base)
            code_of = {s: i + 1 for i, s in enumerate(sources)}
            code_of.update({s: -(i + 1) for i, s in enumerate(targets)})
            with sklearn.config_context(enable_metadata_routing=True):
                out = est.fit_transform(
                    Xf, None if yl is None else yl, sample_domain=_codes(sites, code_of)
                )
            if not isinstance(out, np.ndarray):
                raise TypeError(
                    f"{type(base).__name__} is not a mapping adapter; use make_site_da_pipeline."
                )
            self.adapters_["*"] = est
            self._code_of_ = code_of
            n_out = out.shape[1]
        self._base_ = base
        self._X_target_ = Xt
        self.source_sites_ = sources
        self.target_sites_ = targets
        self.n_features_out_ = int(n_out)
        self.shift_changes_ = {}
        if self.check_shift:
            self._check_shift(Xf, sites, is_t)
        return self

    def _check_shift(self, Xf, sites, is_t):
        """Per source site: discrepancy to the target rows before and after the mapping."""
        rng = np.random.default_rng(0)

        def pick(mask):
            rows = np.flatnonzero(mask)
            if rows.size > SHIFT_CHECK_ROWS:
                rows = np.sort(rng.choice(rows, SHIFT_CHECK_ROWS, replace=False))
            return rows

        t_rows = pick(is_t)
        if t_rows.size < 2:
            return
        T_after = self._transform_rows(Xf[t_rows], sites[t_rows])
        name = self.adapter if isinstance(self.adapter, str) else type(self.adapter).__name__
        for s in self.source_sites_:
            rows = pick(sites == s)
            if rows.size < 2:
                continue
            self.shift_changes_[s] = check_shift_change(
                (Xf[rows], Xf[t_rows]),
                (self._transform_rows(Xf[rows], sites[rows]), T_after),
                name=f"DomainAdapter({name!r})",
                what=f"site {s!r}",
                what_reference=f"the target sites {self.target_sites_!r}",
                stacklevel=4,
            )

    def _transform_rows(self, Xf, sites):
        out = np.empty((Xf.shape[0], self.n_features_out_), dtype=np.float64)
        known = set(self.source_sites_) | set(self.target_sites_)
        unseen = sorted(set(sites.tolist()) - known)
        if unseen and self.unseen == "error":
            raise ValueError(
                f"sites {unseen!r} were not seen in fit (sources {self.source_sites_!r}, "
                f"targets {self.target_sites_!r}). Refit including them, or choose "
                "unseen='reference' (pass them through the target side) or unseen='batch' "
                "(align them onto the target from their rows in this batch)."
            )
        as_target = np.isin(sites, self.target_sites_)
        if self.unseen == "reference":
            as_target |= np.isin(sites, unseen)
        first = next(iter(self.adapters_.values()))
        with sklearn.config_context(enable_metadata_routing=True):
            if as_target.any():
                k = int(as_target.sum())
                out[as_target] = first.transform(
                    Xf[as_target], sample_domain=-np.ones(k, dtype=np.int64), allow_source=True
                )
            if self.per_site:
                for s in self.source_sites_:
                    rows = sites == s
                    if rows.any():
                        out[rows] = self.adapters_[s].transform(
                            Xf[rows],
                            sample_domain=np.ones(int(rows.sum()), dtype=np.int64),
                            allow_source=True,
                        )
            else:
                rows = np.isin(sites, self.source_sites_)
                if rows.any():
                    out[rows] = first.transform(
                        Xf[rows],
                        sample_domain=_codes(sites[rows], self._code_of_),
                        allow_source=True,
                    )
        if unseen and self.unseen == "batch":
            for s in unseen:
                rows = sites == s
                if rows.sum() < 2:
                    raise ValueError(
                        f"unseen='batch' aligns new site {s!r} from its rows in X, but X has only "
                        f"{int(rows.sum())} row of it; at least 2 are needed."
                    )
                warnings.warn(
                    f"site {s!r} was not seen in fit; it is aligned onto the target sites "
                    f"{self.target_sites_!r} by an adapter fitted on its {int(rows.sum())} rows "
                    "in this batch (unseen='batch').",
                    HarmonizationWarning,
                    stacklevel=3,
                )
                est, _ = self._fit_one(self._base_, Xf[rows], None, self._X_target_, None)
                with sklearn.config_context(enable_metadata_routing=True):
                    out[rows] = est.transform(
                        Xf[rows],
                        sample_domain=np.ones(int(rows.sum()), dtype=np.int64),
                        allow_source=True,
                    )
        return out

    def transform(self, X, *, sample_domain=None):
        """Map the rows of every site with that site's adapter.

        Parameters
        ----------
        X : DataFrame or array-like
            Same layout as in ``fit``.
        sample_domain : array-like of shape (n_samples,), optional
            Site label of each row (metadata routing).

        Returns
        -------
        ndarray of shape (n_samples, n_features_out_)
            Adapted features (the site column is dropped).
        """
        check_is_fitted(self, "adapters_")
        Xf, sites, _ = _split_sites(self, X, sample_domain, fitting=False)
        return self._transform_rows(Xf, sites)

    def fit_transform(self, X, y=None, *, sample_domain=None):
        """Fit, then transform the same rows."""
        return self.fit(X, y, sample_domain=sample_domain).transform(
            X, sample_domain=sample_domain
        )

    def get_feature_names_out(self, input_features=None):
        """Input feature names (site column dropped) for maps that keep the feature space,
        ``"<adapter><i>"`` for adapters that project onto fewer components."""
        check_is_fitted(self, "adapters_")
        if self.n_features_out_ == len(self._feature_names_):
            return np.asarray(self._feature_names_, dtype=object)
        prefix = type(self._base_).__name__.lower().removesuffix("adapter")
        return np.asarray([f"{prefix}{i}" for i in range(self.n_features_out_)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True
        return tags


# --------------------------------------------------------------------------------------------
# SiteDAPipeline
# --------------------------------------------------------------------------------------------
def _final_base(pipeline):
    last = pipeline.steps[-1][1] if hasattr(pipeline, "steps") else pipeline
    return getattr(last, "base_estimator", last)


def _accepts(est, method: str, param: str) -> bool:
    import inspect

    fn = getattr(est, method, None)
    if fn is None:
        return False
    try:
        return param in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False


def _as_skada_pipeline(pipeline):
    """A skada DA pipeline (steps wrapped in selectors) built from ``pipeline``."""
    skada = import_skada()
    from sklearn.pipeline import Pipeline

    if isinstance(pipeline, Pipeline):
        steps = pipeline.steps
        if all(isinstance(s, skada.base.BaseSelector) for _, s in steps):
            return clone(pipeline)
        steps = [
            (n, _resolve_adapter(s, name=f"step {n!r}") if isinstance(s, str) else clone(s))
            for n, s in steps
        ]
        return skada.make_da_pipeline(*steps)
    if isinstance(pipeline, str):
        raise ValueError(
            f"pipeline={pipeline!r}: an adapter alone cannot predict; pass an estimator after "
            "it, e.g. make_site_da_pipeline('coral', LogisticRegression())."
        )
    return skada.make_da_pipeline(clone(pipeline))


def _request_sample_weight(pipeline) -> None:
    """Let the final estimator receive the reweighting adapters' (and IW scorers') weights."""
    final = _final_base(pipeline)
    reqs = final.get_metadata_routing()
    if _accepts(final, "fit", "sample_weight") and reqs.fit.requests.get("sample_weight") is None:
        final.set_fit_request(sample_weight=True)
    if (
        _accepts(final, "score", "sample_weight")
        and reqs.score.requests.get("sample_weight") is None
    ):
        final.set_score_request(sample_weight=True)


def _final_has(method: str):
    def check(self) -> bool:
        pipe = self.pipeline
        final = _final_base(pipe) if hasattr(pipe, "steps") else pipe
        return hasattr(final, method)

    return check


class SiteDAPipeline(MetaEstimatorMixin, BaseEstimator):
    """A skada domain-adaptation pipeline driven by skrtl site labels.

    Wraps a skada pipeline (adapter(s) then an estimator, see :func:`make_site_da_pipeline`)
    so that it takes skrtl input: a feature DataFrame with a ``site`` column (or an array with
    a routed ``sample_domain`` of site labels), with the target rows in ``X`` and their
    labels unknown or hidden by ``target_sites``. In ``fit`` it maps the sites to skada's
    domain codes (source ``>= 0``, target ``< 0``), masks the target labels (skada keeps those
    rows out of the estimator's fit), lets the final estimator receive the sample weights of a
    reweighting adapter, and fits the skada pipeline with metadata routing on (only around
    that call). ``predict`` codes each row by its site, so source-site rows go through the
    source side of the adapter and target rows through the target side.

    It is a plain sklearn estimator: put it last in a Pipeline after a feature transformer
    with ``set_output(transform="pandas")``, run it in ``cross_validate`` (the site column is
    split with the rows), tune it with ``GridSearchCV`` (``pipeline__coraladapter__reg``), and
    select adaptation models with the unsupervised scorers of :func:`make_site_da_scorer`.

    Parameters
    ----------
    pipeline : sklearn Pipeline or estimator
        A skada pipeline (``skada.make_da_pipeline(...)``), or a sklearn Pipeline / estimator
        whose steps are wrapped in skada's selectors at fit. Cloned in ``fit``.
    site_column : str or None, default="site"
        Column of a DataFrame ``X`` with the site of each row (dropped before the pipeline).
    target_sites : str, list of str or None, default=None
        Target sites; their labels are hidden from the estimator even when given. ``None``:
        the sites whose rows all have an unknown label (``NaN`` / ``None``, or ``-1`` for
        integer labels).
    unseen : {"error", "reference", "batch"}, default="error"
        Rows of a site seen in ``fit`` neither as source nor as target: ``"error"`` raises;
        ``"reference"`` treats them as target rows (the space the estimator was adapted to);
        ``"batch"`` refits a copy of the pipeline with that site's rows in the batch as the
        target (the training sources kept, the training targets left out) and predicts them
        with it (issues a :class:`~skrtl.HarmonizationWarning`; at least 2 rows).

    Attributes
    ----------
    pipeline_ : sklearn Pipeline
        The fitted skada pipeline (on float arrays and integer domain codes).
    classes_ : ndarray
        Class labels (classifiers only).
    source_sites_, target_sites_ : list of str
    domain_codes_ : dict
        skada code of each site (sources ``1, 2, ...``, targets ``-1, -2, ...``).
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only for DataFrame input.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from sklearn.linear_model import LogisticRegression
    >>> rng = np.random.default_rng(0)
    >>> X = pd.DataFrame(rng.normal(size=(80, 2)), columns=["f1", "f2"])
    >>> X["site"] = np.repeat(["A", "B"], 40)
    >>> y = (X["f1"] > 0).astype(int).to_numpy()
    >>> y[40:] = -1  # site B is unlabelled
    >>> model = make_site_da_pipeline("coral", LogisticRegression()).fit(X, y)
    >>> model.target_sites_, model.predict(X.iloc[40:45]).shape
    (['B'], (5,))
    """

    _parameter_constraints: dict = {
        "pipeline": [HasMethods(["fit"])],
        "site_column": [str, Integral, None],
        "target_sites": [str, Integral, list, tuple, np.ndarray, None],
        "unseen": [StrOptions(_UNSEEN)],
    }

    __metadata_request__fit = {"sample_domain": True}
    __metadata_request__predict = {"sample_domain": True}
    __metadata_request__predict_proba = {"sample_domain": True}
    __metadata_request__predict_log_proba = {"sample_domain": True}
    __metadata_request__decision_function = {"sample_domain": True}
    __metadata_request__score = {"sample_domain": True}

    def __init__(self, pipeline, *, site_column="site", target_sites=None, unseen="error"):
        self.pipeline = pipeline
        self.site_column = site_column
        self.target_sites = target_sites
        self.unseen = unseen

    @property
    def _is_classifier(self) -> bool:
        try:
            pipe = self.pipeline
            final = _final_base(pipe) if hasattr(pipe, "steps") else pipe
            return get_tags(final).estimator_type == "classifier"
        except Exception:  # pragma: no cover - unusual estimators
            return False

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        pipe = self.pipeline
        final = _final_base(pipe) if hasattr(pipe, "steps") else pipe
        final_tags = get_tags(final)
        tags.estimator_type = final_tags.estimator_type
        tags.classifier_tags = final_tags.classifier_tags
        tags.regressor_tags = final_tags.regressor_tags
        tags.input_tags.string = True
        tags.target_tags.required = True
        return tags

    # ----------------------------------------------------------------------------------------
    def _encode_y(self, y, unl):
        if self._is_classifier:
            enc = np.full(y.shape[0], -1, dtype=np.int64)
            labelled = ~unl
            classes, inv = np.unique(y[labelled], return_inverse=True)
            enc[labelled] = inv
            return enc, classes
        out = np.asarray(y, dtype=np.float64).copy()
        out[unl] = np.nan
        return out, None

    def fit(self, X, y, *, sample_domain=None, sample_weight=None):
        """Fit the skada pipeline with source / target codes built from the site labels.

        Parameters
        ----------
        X : DataFrame or array-like of shape (n_samples, n_features)
            Features of source and target rows, plus the site column for a DataFrame.
        y : array-like of shape (n_samples,)
            Labels of the source rows; target rows' labels are unknown (``NaN`` / ``None`` /
            ``-1``) or ignored (sites in ``target_sites``).
        sample_domain : array-like of shape (n_samples,), optional
            Site label of each row (metadata routing), instead of ``X[site_column]``.
        sample_weight : array-like of shape (n_samples,), optional
            Passed to the final estimator (with a reweighting adapter, its weights win).

        Returns
        -------
        self
        """
        self._validate_params()
        if y is None:
            raise ValueError(
                "SiteDAPipeline requires y to be passed, but the target y is None: give the "
                "labels of the source rows, and mark target rows with NaN / -1 or list their "
                "sites in target_sites."
            )
        Xf, sites, _ = _split_sites(self, X, sample_domain, fitting=True)
        y = np.asarray(y)
        if y.ndim != 1 or y.shape[0] != Xf.shape[0]:
            raise ValueError(f"y must have shape ({Xf.shape[0]},), got {y.shape!r}.")
        unl = _unlabelled(y, regression=not self._is_classifier)
        sources, targets = _decide_targets(sites, unl, self.target_sites, type(self).__name__)
        is_t = np.isin(sites, targets)
        unl = unl | is_t
        y_enc, classes = self._encode_y(y, unl)
        if classes is not None:
            if classes.size < 2:
                raise ValueError(
                    f"the labelled source rows hold only the class {classes.tolist()!r}; a "
                    "classifier needs at least 2 classes."
                )
            self.classes_ = classes
        code_of = {s: i + 1 for i, s in enumerate(sources)}
        code_of.update({s: -(i + 1) for i, s in enumerate(targets)})
        codes = _codes(sites, code_of)
        with sklearn.config_context(enable_metadata_routing=True):
            pipe = _as_skada_pipeline(self.pipeline)
            _request_sample_weight(pipe)
            params = {"sample_domain": codes}
            if sample_weight is not None:
                params["sample_weight"] = np.asarray(sample_weight, dtype=np.float64)
            pipe.fit(Xf, y_enc, **params)
        self.pipeline_ = pipe
        self.source_sites_ = sources
        self.target_sites_ = targets
        self.domain_codes_ = code_of
        self._train_ = (Xf[~is_t], y_enc[~is_t], codes[~is_t])
        return self

    # ----------------------------------------------------------------------------------------
    def encode_domains(self, X, y=None, *, sample_domain=None):
        """skada's view of rows: float features, domain codes and masked, encoded labels.

        Used by :func:`make_site_da_scorer` to run skada's scorers on :attr:`pipeline_`. Rows of a
        site unseen in ``fit`` are coded as target with ``unseen="reference"`` and refused
        otherwise.

        Parameters
        ----------
        X : DataFrame or array-like
            Same layout as in ``fit``.
        y : array-like of shape (n_samples,), optional
            Labels; those of target rows are replaced by skada's mask (``-1`` or ``NaN``).
        sample_domain : array-like, optional
            Site label of each row.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
        sample_domain : ndarray of int of shape (n_samples,)
        y : ndarray of shape (n_samples,) or None
            Class indices into :attr:`classes_` (``-1`` for target rows) for classifiers,
            floats (``NaN`` for target rows) for regressors.
        """
        check_is_fitted(self, "pipeline_")
        Xf, sites, _ = _split_sites(self, X, sample_domain, fitting=False)
        unseen = sorted(set(sites.tolist()) - set(self.domain_codes_))
        if unseen and self.unseen != "reference":
            raise ValueError(
                f"sites {unseen!r} were not seen in fit (codes: {self.domain_codes_!r}); score "
                "rows of fitted sites only, or use unseen='reference'."
            )
        codes = np.array([self.domain_codes_.get(s, -1) for s in sites], dtype=np.int64)
        if y is None:
            return Xf, codes, None
        y = np.asarray(y)
        is_t = codes < 0
        unl = _unlabelled(y, regression=not self._is_classifier)
        bad = ~is_t & unl
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} rows of source sites have no label; scorers need the source "
                "labels."
            )
        if self._is_classifier:
            enc = np.full(y.shape[0], -1, dtype=np.int64)
            src = ~is_t
            idx = np.searchsorted(self.classes_, y[src])
            idx = np.clip(idx, 0, len(self.classes_) - 1)
            if not np.array_equal(self.classes_[idx], y[src]):
                raise ValueError(
                    f"y holds labels not seen in fit (classes: {self.classes_.tolist()!r})."
                )
            enc[src] = idx
            return Xf, codes, enc
        out = y.astype(np.float64).copy()
        out[is_t] = np.nan
        return Xf, codes, out

    def _delegate(self, method, X, sample_domain):
        check_is_fitted(self, "pipeline_")
        Xf, sites, _ = _split_sites(self, X, sample_domain, fitting=False)
        known = set(self.domain_codes_)
        unseen = sorted(set(sites.tolist()) - known)
        if unseen and self.unseen == "error":
            raise ValueError(
                f"sites {unseen!r} were not seen in fit (sources {self.source_sites_!r}, "
                f"targets {self.target_sites_!r}). Refit with them as targets, or choose "
                "unseen='reference' (treat them as target rows) or unseen='batch' (adapt to "
                "them from their rows in this batch)."
            )
        codes = np.array([self.domain_codes_.get(s, -1) for s in sites], dtype=np.int64)
        batch = self.unseen == "batch" and bool(unseen)
        keep = ~np.isin(sites, unseen) if batch else np.ones(len(sites), dtype=bool)
        out = None
        with sklearn.config_context(enable_metadata_routing=True):
            if keep.any():
                part = getattr(self.pipeline_, method)(
                    Xf[keep], sample_domain=codes[keep], allow_source=True
                )
                out = np.empty((len(sites),) + part.shape[1:], dtype=part.dtype)
                out[keep] = part
            if batch:
                Xs, ys, cs = self._train_
                for s in unseen:
                    rows = sites == s
                    k = int(rows.sum())
                    if k < 2:
                        raise ValueError(
                            f"unseen='batch' adapts to new site {s!r} from its rows in X, but X "
                            f"has only {k} row of it; at least 2 are needed."
                        )
                    warnings.warn(
                        f"site {s!r} was not seen in fit; the pipeline is refitted with its {k} "
                        "rows in this batch as the target (unseen='batch').",
                        HarmonizationWarning,
                        stacklevel=3,
                    )
                    pipe = _as_skada_pipeline(self.pipeline)
                    _request_sample_weight(pipe)
                    yt = np.full(k, -1) if ys.dtype.kind == "i" else np.full(k, np.nan)
                    pipe.fit(
                        np.vstack([Xs, Xf[rows]]),
                        np.r_[ys, yt],
                        sample_domain=np.r_[cs, -np.ones(k, dtype=np.int64)],
                    )
                    part = getattr(pipe, method)(
                        Xf[rows], sample_domain=-np.ones(k, dtype=np.int64), allow_source=True
                    )
                    if out is None:
                        out = np.empty((len(sites),) + part.shape[1:], dtype=part.dtype)
                    out[rows] = part
        return out

    def predict(self, X, *, sample_domain=None):
        """Predict with every row coded by its site (labels in the original encoding)."""
        pred = self._delegate("predict", X, sample_domain)
        if self._is_classifier:
            return self.classes_[np.asarray(pred, dtype=np.int64)]
        return pred

    @available_if(_final_has("predict_proba"))
    def predict_proba(self, X, *, sample_domain=None):
        """Class probabilities, columns in the order of :attr:`classes_`."""
        return self._delegate("predict_proba", X, sample_domain)

    @available_if(_final_has("predict_log_proba"))
    def predict_log_proba(self, X, *, sample_domain=None):
        """Log class probabilities."""
        return self._delegate("predict_log_proba", X, sample_domain)

    @available_if(_final_has("decision_function"))
    def decision_function(self, X, *, sample_domain=None):
        """Decision function of the final estimator."""
        return self._delegate("decision_function", X, sample_domain)

    def score(self, X, y, *, sample_domain=None, sample_weight=None):
        """Accuracy (classifiers) or R^2 (regressors) on the rows with a known label."""
        y = np.asarray(y)
        unl = _unlabelled(y, regression=not self._is_classifier)
        if unl.all():
            raise ValueError("score needs labelled rows; every row of y is unknown.")
        pred = self.predict(X, sample_domain=sample_domain)
        w = None if sample_weight is None else np.asarray(sample_weight)[~unl]
        metric = accuracy_score if self._is_classifier else r2_score
        return float(metric(y[~unl], pred[~unl], sample_weight=w))


def make_site_da_pipeline(*steps, site_column="site", target_sites=None, unseen="error"):
    """Build a :class:`SiteDAPipeline` from adapters and an estimator, as skada's
    ``make_da_pipeline`` does, but driven by skrtl site labels.

    Parameters
    ----------
    *steps : estimators, skada adapters, adapter names or (name, estimator) tuples
        Applied in order; the last one predicts. An adapter may be given by its short name
        (:data:`DA_ADAPTERS`: ``"coral"``, ``"subspace_alignment"``, ``"kmm"``, ...). Plain
        sklearn steps (scalers, PCA, ComBat) are wrapped in skada's shared selector.
    site_column, target_sites, unseen
        See :class:`SiteDAPipeline`.

    Returns
    -------
    SiteDAPipeline

    Examples
    --------
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.preprocessing import StandardScaler
    >>> model = make_site_da_pipeline(StandardScaler(), "coral", LogisticRegression())
    >>> [name for name, _ in model.pipeline.steps]
    ['standardscaler', 'coraladapter', 'logisticregression']
    """
    if not steps:
        raise TypeError("make_site_da_pipeline needs at least one step (the estimator).")
    skada = import_skada()
    resolved = []
    for i, step in enumerate(steps):
        name, est = step if isinstance(step, tuple) else (None, step)
        if isinstance(est, str):
            est = _resolve_adapter(est, name=f"step {i}")
        resolved.append(est if name is None else (name, est))
    if isinstance(resolved[-1], tuple):
        last = resolved[-1][1]
    else:
        last = resolved[-1]
    if isinstance(last, skada.BaseAdapter):
        raise ValueError(
            f"the last step {type(last).__name__} is an adapter; end the pipeline with an "
            "estimator, e.g. make_site_da_pipeline('coral', LogisticRegression())."
        )
    with sklearn.config_context(enable_metadata_routing=True):
        pipe = skada.make_da_pipeline(*resolved)
    return SiteDAPipeline(pipe, site_column=site_column, target_sites=target_sites, unseen=unseen)
