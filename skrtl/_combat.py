"""Feature-level ComBat harmonization (empirical-Bayes location/scale batch correction).

Radiomic and deep features extracted at different hospitals carry *site effects*: every scanner,
kernel and protocol shifts and rescales each feature. ComBat (Johnson et al. 2007, Fortin et al.
2017/2018) models feature ``g`` of sample ``j`` at site ``i`` as

``y_ijg = alpha_g + x_ij^T beta_g + gamma_ig + delta_ig * eps_ijg``

with ``alpha_g`` the overall mean, ``beta_g`` the effect of biological covariates to preserve,
and ``gamma_ig`` / ``delta_ig`` an additive / multiplicative site effect, shrunk towards a common
prior across features by empirical Bayes. :class:`ComBatHarmonizer` learns all of this in
``fit`` (on the training fold only, so there is no leakage inside cross-validation) and applies
it to new samples of sites seen in ``fit``.

The numerics follow the ``neuroCombat`` package (Fortin) step by step, so that the output of
``fit_transform`` agrees with ``neuroCombat.neuroCombat`` to floating-point precision
(tested to 1e-6 when ``neuroCombat`` is installed).
"""

from __future__ import annotations

import warnings
from numbers import Integral

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils.validation import check_is_fitted

from ._base import (
    DEFAULT_SITE_COLUMN,
    SHIFT_CHECK_ROWS,
    HarmonizationWarning,
    check_shift_change,
    resolve_unseen,
    split_site_features,
    unseen_constraint,
)

__all__ = ["ComBatHarmonizer", "ComBatWarning"]


class ComBatWarning(HarmonizationWarning):
    """ComBat used a documented fallback (unseen site estimated from the batch itself)."""


def _postmean(g_hat, g_bar, n, d_star, t2):
    return (t2 * n * g_hat + d_star * g_bar) / (t2 * n + d_star)


def _postvar(sum2, n, a, b):
    return (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)


def _a_prior(delta_hat):
    m = np.mean(delta_hat)
    s2 = np.var(delta_hat, ddof=1)
    return (2.0 * s2 + m**2) / s2


def _b_prior(delta_hat):
    m = np.mean(delta_hat)
    s2 = np.var(delta_hat, ddof=1)
    return (m * s2 + m**3) / s2


def _parametric_eb(s, g_hat, d_hat, g_bar, t2, a, b, conv=1e-4, max_iter=10_000):
    """Iterative posterior means of the site location/scale (Johnson et al. 2007)."""
    n = s.shape[0]
    g_old, d_old = g_hat.copy(), d_hat.copy()
    g_new, d_new = g_old, d_old
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(max_iter):
            g_new = _postmean(g_hat, g_bar, n, d_old, t2)
            sum2 = ((s - g_new[None, :]) ** 2).sum(axis=0)
            d_new = _postvar(sum2, n, a, b)
            change = max(
                np.max(np.abs(g_new - g_old) / g_old), np.max(np.abs(d_new - d_old) / d_old)
            )
            g_old, d_old = g_new, d_new
            if not change > conv:
                break
    return g_new, d_new


def _nonparametric_eb(s, g_hat, d_hat, chunk=256):
    """Non-parametric EB: each feature's posterior under the other features' empirical prior."""
    n, p = s.shape
    sx = s.sum(axis=0)
    sxx = (s**2).sum(axis=0)
    g_star = np.empty(p)
    d_star = np.empty(p)
    for start in range(0, p, chunk):
        rows = np.arange(start, min(start + chunk, p))
        # sum2[r, j] = sum_k (s_kr - g_j)^2 for feature r under prior point j
        sum2 = sxx[rows, None] - 2.0 * sx[rows, None] * g_hat[None, :] + n * g_hat[None, :] ** 2
        sum2 = np.maximum(sum2, 0.0)
        log_lh = -0.5 * n * np.log(2 * np.pi * d_hat)[None, :] - sum2 / (2.0 * d_hat[None, :])
        log_lh[np.arange(rows.size), rows] = -np.inf  # leave the feature itself out
        log_lh -= log_lh.max(axis=1, keepdims=True)
        w = np.exp(log_lh)
        w /= w.sum(axis=1, keepdims=True)
        g_star[rows] = w @ g_hat
        d_star[rows] = w @ d_hat
    return g_star, d_star


class ComBatHarmonizer(TransformerMixin, BaseEstimator):
    """ComBat harmonization of feature matrices across acquisition sites.

    Learns, on the training data only, the pooled feature mean and variance, the effect of
    covariates to preserve, and an empirical-Bayes additive (``gamma``) and multiplicative
    (``delta``) effect per site and feature; ``transform`` removes the site effect of each
    sample's site. Output agrees with ``neuroCombat.neuroCombat`` (same options) to 1e-6.

    Site labels come from either

    * a column of a pandas ``X`` named by ``site_column`` (default ``"site"``): it is dropped from
      the output, so a :class:`~sklearn.pipeline.Pipeline` can carry it to this step, and it is
      available at predict time inside cross-validation scorers (recommended); or
    * ``sample_domain`` passed to ``fit`` / ``transform`` (sklearn metadata routing: call
      ``set_fit_request(sample_domain=True).set_transform_request(sample_domain=True)`` with
      ``sklearn.config_context(enable_metadata_routing=True)``), following skada.

    Parameters
    ----------
    site_column : str or None, default="site"
        Column of a DataFrame ``X`` holding the site of each row. Ignored for arrays.
    covariates : list of str or None, default=None
        Columns of ``X`` whose biological effect is preserved (e.g. age, sex, stage). Numeric
        columns are continuous, other dtypes (object, category, bool, string) categorical
        (one-hot, first level dropped). They must also be present at ``transform``; they are
        returned unchanged (not harmonized) after the harmonized features. Covariates can also
        be routed as ``sample_covariates`` (array ``(n, k)`` or DataFrame) in fit / transform.
    eb : bool, default=True
        Empirical-Bayes shrinkage of the site effects (``False``: plain per-site location/scale).
    parametric : bool, default=True
        Parametric (normal / inverse-gamma prior, iterative) or non-parametric EB.
    mean_only : bool, default=False
        Correct only the additive site effect (no scaling).
    unseen : {"error", "reference", "batch"}, default="error"
        What ``transform`` does with a site absent from ``fit``: ``"error"`` raises;
        ``"reference"`` leaves those rows unharmonized (no site effect removed: with the pooled
        mean and variance this is the identity); ``"batch"`` estimates that site's location/scale
        from the rows of the new site in the transformed batch itself (reference-free ComBat,
        needs at least 2 rows of that site; issues a :class:`ComBatWarning`).
    check_shift : bool, default=True
        After fitting, measure for every site the discrepancy between its rows and the rows
        of the other sites (squared MMD of the features, at most 200 random rows of each side)
        before and after harmonization, and issue a :class:`~skrtl.HarmonizationWarning` when
        harmonization *increased* it (:func:`skrtl._base.check_shift_change`;
        ``shift_changes_``).

    Attributes
    ----------
    sites_ : ndarray of shape (n_sites,)
        Sites seen in ``fit`` (sorted).
    grand_mean_ : ndarray of shape (n_features,)
    var_pooled_ : ndarray of shape (n_features,)
    beta_covariates_ : ndarray of shape (n_covariate_columns, n_features)
    gamma_star_, delta_star_ : ndarray of shape (n_sites, n_features)
        EB site effects on the standardised scale.
    gamma_hat_, delta_hat_ : ndarray of shape (n_sites, n_features)
        Site effects before shrinkage.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only for DataFrame input.
    shift_changes_ : dict
        ``check_shift=True``: site -> :class:`skrtl._base.ShiftChange`.

    Notes
    -----
    A feature constant within one site (site variance zero up to rounding, below 1e-20 on the
    standardised scale) gets the site scale 1 before the EB prior, as neuroCombat's exact-zero
    rule. Features with zero pooled variance are left unchanged (neuroCombat's iterative EB stops
    early on such features and gives slightly different results for the *other* features of the
    same fit; compare on non-constant features). The non-parametric EB is computed in log space,
    which equals neuroCombat's formula when its likelihoods do not underflow (neuroCombat returns
    NaN when they do). ``neuroCombatFromTraining`` ignores the covariates of new samples; this
    class uses them, so ``transform`` of the training rows equals ``fit_transform``.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> X = pd.DataFrame(rng.normal(size=(40, 3)), columns=["f1", "f2", "f3"])
    >>> X["site"] = np.repeat(["A", "B"], 20)
    >>> X.loc[X.site == "B", ["f1", "f2", "f3"]] += 2.0
    >>> Xh = ComBatHarmonizer().fit_transform(X)
    >>> Xh.shape
    (40, 3)
    """

    _parameter_constraints: dict = {
        "site_column": [str, Integral, None],
        "covariates": [list, tuple, None],
        "eb": ["boolean"],
        "parametric": ["boolean"],
        "mean_only": ["boolean"],
        "unseen": unseen_constraint(),
        "check_shift": ["boolean"],
    }

    __metadata_request__fit = {"sample_domain": True, "sample_covariates": True}
    __metadata_request__transform = {"sample_domain": True, "sample_covariates": True}

    def __init__(
        self,
        *,
        site_column=DEFAULT_SITE_COLUMN,
        covariates=None,
        eb=True,
        parametric=True,
        mean_only=False,
        unseen="error",
        check_shift=True,
    ):
        self.site_column = site_column
        self.covariates = covariates
        self.eb = eb
        self.parametric = parametric
        self.mean_only = mean_only
        self.unseen = unseen
        self.check_shift = check_shift

    # ----------------------------------------------------------------------------------------
    # input handling
    # ----------------------------------------------------------------------------------------
    def _split_input(self, X, sample_domain, sample_covariates, *, fitting):
        """Return (features float64, sites, covariate frame or None, feature names)."""
        covs = list(self.covariates) if self.covariates is not None else []
        Xf, sites, feature_cols = split_site_features(
            self,
            X,
            sample_domain=sample_domain,
            fitting=fitting,
            exclude=covs,
            what="every column except the site column and the covariates",
        )
        cov_df = X[covs] if covs else None
        if sites is None:
            raise ValueError(
                f"{type(self).__name__} needs the site of every row: pass a DataFrame X with a "
                f"{self.site_column!r} column (site_column={self.site_column!r}), or route "
                "sample_domain=... (metadata routing)."
            )
        if sample_covariates is not None:
            sc = sample_covariates
            if not isinstance(sc, pd.DataFrame):
                arr = np.asarray(sc)
                arr = arr.reshape(-1, 1) if arr.ndim == 1 else arr
                sc = pd.DataFrame(arr, columns=[f"cov{i}" for i in range(arr.shape[1])])
            if len(sc) != Xf.shape[0]:
                raise ValueError(f"sample_covariates has {len(sc)} rows but X has {Xf.shape[0]}.")
            sc = sc.reset_index(drop=True)
            cov_df = (
                sc if cov_df is None else pd.concat([cov_df.reset_index(drop=True), sc], axis=1)
            )
        elif not fitting and getattr(self, "_routed_cov_names", None):
            raise ValueError(
                "sample_covariates were given in fit; pass them to transform as well."
            )
        return Xf, np.asarray(sites), cov_df, feature_cols

    def _covariate_design(self, cov_df, n, *, fitting):
        if cov_df is None:
            if fitting:
                self._cov_spec = []
            return np.zeros((n, 0))
        cov_df = cov_df.reset_index(drop=True)
        blocks = []
        if fitting:
            spec = []
            for name in cov_df.columns:
                col = cov_df[name]
                if pd.api.types.is_bool_dtype(col) or not pd.api.types.is_numeric_dtype(col):
                    levels = np.unique(col.astype(str).to_numpy())
                    spec.append((name, "cat", levels))
                else:
                    spec.append((name, "num", None))
            self._cov_spec = spec
        for name, kind, levels in self._cov_spec:
            if name not in cov_df.columns:
                raise ValueError(f"covariate {name!r} is missing at transform time.")
            col = cov_df[name]
            if pd.isna(col).any():
                raise ValueError(f"covariate {name!r} has missing values; impute them first.")
            if kind == "num":
                blocks.append(col.to_numpy(dtype=np.float64)[:, None])
            else:
                vals = col.astype(str).to_numpy()
                bad = sorted(set(vals) - set(levels))
                if bad:
                    raise ValueError(
                        f"covariate {name!r} has levels {bad!r} not seen in fit "
                        f"(known: {list(levels)!r})."
                    )
                blocks.append((vals[:, None] == levels[None, 1:]).astype(np.float64))
        n = len(cov_df)
        return np.hstack(blocks) if blocks else np.zeros((n, 0))

    # ----------------------------------------------------------------------------------------
    # fit / transform
    # ----------------------------------------------------------------------------------------
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, *, sample_domain=None, sample_covariates=None):
        """Learn pooled moments, covariate effects and EB site effects.

        Parameters
        ----------
        X : DataFrame or array-like of shape (n_samples, n_features)
            Features (plus, for a DataFrame, the site column and covariate columns).
        y : ignored
        sample_domain : array-like of shape (n_samples,), optional
            Site of each row (metadata routing), instead of ``X[site_column]``.
        sample_covariates : array-like or DataFrame of shape (n_samples, k), optional
            Covariates to preserve (metadata routing), in addition to ``covariates``.

        Returns
        -------
        self
        """
        self._routed_cov_names = None
        X_, sites, cov_df, feature_cols = self._split_input(
            X, sample_domain, sample_covariates, fitting=True
        )
        self._routed_cov_names = None if sample_covariates is None else True
        self._fit_feature_cols = feature_cols
        n, p = X_.shape
        site_str = sites.astype(str)
        levels, counts = np.unique(site_str, return_counts=True)
        if levels.size < 2:
            raise ValueError(
                f"ComBat needs at least 2 sites in fit, got only {[str(v) for v in levels]!r}; "
                "there is no site effect to estimate."
            )
        if counts.min() < 2:
            small = [str(v) for v in levels[counts < 2]]
            raise ValueError(
                f"every site needs at least 2 rows in fit (a site variance is estimated); sites "
                f"{small!r} have 1. Merge them with a similar site or drop them."
            )
        C = self._covariate_design(cov_df, X_.shape[0], fitting=True)
        onehot = (site_str[:, None] == levels[None, :]).astype(np.float64)
        design = np.hstack([onehot, C])
        if np.linalg.matrix_rank(design) < design.shape[1]:
            raise ValueError(
                "the design matrix (site one-hot + covariates) is rank deficient: a covariate is "
                "confounded with site (e.g. one site contains only one category). ComBat cannot "
                "separate the site effect from that covariate; drop it from covariates."
            )
        B = np.linalg.solve(design.T @ design, design.T @ X_)  # (n_sites + k, p)
        n_sites = levels.size
        grand_mean = (counts / n) @ B[:n_sites]
        resid = X_ - design @ B
        var_pooled = (resid**2).mean(axis=0)
        const = var_pooled <= 1e-30 * np.maximum(1.0, grand_mean**2)
        var_pooled = np.where(const, 1.0, var_pooled)
        beta_cov = B[n_sites:]
        s = (X_ - grand_mean - C @ beta_cov) / np.sqrt(var_pooled)
        active = ~const
        gamma_hat = np.zeros((n_sites, p))
        delta_hat = np.ones((n_sites, p))
        gamma_star = np.zeros((n_sites, p))
        delta_star = np.ones((n_sites, p))
        sa = s[:, active]
        for i, lev in enumerate(levels):
            rows = site_str == lev
            g_hat, d_hat = self._site_moments(sa[rows])
            gamma_hat[i, active], delta_hat[i, active] = g_hat, d_hat
            gamma_star[i, active], delta_star[i, active] = self._eb(sa[rows], g_hat, d_hat)
        self.sites_ = levels
        self.site_counts_ = counts
        self.grand_mean_ = grand_mean
        self.var_pooled_ = var_pooled
        self.beta_covariates_ = beta_cov
        self.gamma_hat_, self.delta_hat_ = gamma_hat, delta_hat
        self.gamma_star_, self.delta_star_ = gamma_star, delta_star
        self.constant_features_ = const
        self.shift_changes_ = {}
        if self.check_shift:
            self._check_shift(X, X_, site_str, sample_domain, sample_covariates)
        return self

    def _check_shift(self, X, X_, site_str, sample_domain, sample_covariates):
        """Per site: discrepancy to the other sites before and after harmonization."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # a deprecated option, said in fit
            after = self.transform(
                X, sample_domain=sample_domain, sample_covariates=sample_covariates
            )
        after = np.asarray(np.asarray(after)[:, : X_.shape[1]], dtype=np.float64)
        rng = np.random.default_rng(0)

        def pick(rows):
            rows = np.flatnonzero(rows)
            if rows.size > SHIFT_CHECK_ROWS:
                rows = np.sort(rng.choice(rows, SHIFT_CHECK_ROWS, replace=False))
            return rows

        for lev in self.sites_:
            own, rest = pick(site_str == lev), pick(site_str != lev)
            self.shift_changes_[str(lev)] = check_shift_change(
                (X_[rest], X_[own]),
                (after[rest], after[own]),
                name=type(self).__name__,
                what=f"site {str(lev)!r}",
                what_reference="the other sites",
                stacklevel=4,
            )

    def _site_moments(self, s):
        g_hat = s.mean(axis=0)
        if self.mean_only:
            d_hat = np.ones(s.shape[1])
        else:
            # a feature constant within the site gets scale 1 (neuroCombat's convert_zeroes);
            # "constant" up to rounding: the standardised data are O(1)
            d_hat = np.var(s, axis=0, ddof=1)
            d_hat = np.where(d_hat <= 1e-20, 1.0, d_hat)
        return g_hat, d_hat

    def _eb(self, s, g_hat, d_hat):
        if not self.eb or g_hat.size < 2:
            return g_hat, d_hat
        g_bar = np.mean(g_hat)
        t2 = np.var(g_hat, ddof=1)
        if self.parametric:
            if self.mean_only:
                return _postmean(g_hat, g_bar, 1, 1, t2), np.ones_like(d_hat)
            a, b = _a_prior(d_hat), _b_prior(d_hat)
            return _parametric_eb(s, g_hat, d_hat, g_bar, t2, a, b)
        g_star, d_star = _nonparametric_eb(
            s, g_hat, np.ones_like(d_hat) if self.mean_only else d_hat
        )
        if self.mean_only:
            # neuroCombat returns the weighted prior scales (all ones) for mean_only
            d_star = np.ones_like(d_hat)
        return g_star, d_star

    def transform(self, X, *, sample_domain=None, sample_covariates=None):
        """Remove the site effect of each row's site.

        Parameters
        ----------
        X : DataFrame or array-like
            Same layout as in ``fit``.
        sample_domain : array-like of shape (n_samples,), optional
            Site of each row (metadata routing), instead of ``X[site_column]``.
        sample_covariates : array-like or DataFrame, optional
            Routed covariates, required if given in ``fit``.

        Returns
        -------
        ndarray of shape (n_samples, n_features_out)
            Harmonized features, followed by the (unchanged) covariate columns of ``X``.

        Raises
        ------
        ValueError
            For a site not seen in ``fit`` when ``unseen="error"``.
        """
        check_is_fitted(self, "gamma_star_")
        X_, sites, cov_df, _ = self._split_input(
            X, sample_domain, sample_covariates, fitting=False
        )
        C = self._covariate_design(cov_df, X_.shape[0], fitting=False)
        if C.shape[1] != self.beta_covariates_.shape[0]:
            raise ValueError(
                f"got {C.shape[1]} covariate columns at transform but "
                f"{self.beta_covariates_.shape[0]} in fit; pass the same covariates."
            )
        site_str = sites.astype(str)
        known = np.isin(site_str, self.sites_)
        unseen = resolve_unseen(self.unseen, type(self).__name__)
        if not known.all():
            new = sorted(str(v) for v in set(site_str[~known]))
            if unseen == "error":
                raise ValueError(
                    f"sites {new!r} were not seen in fit (known sites: "
                    f"{[str(v) for v in self.sites_]!r}). "
                    "ComBat can only remove the effect of a site it was fitted on. Refit "
                    "including that site, or choose unseen='reference' (leave those rows "
                    "unharmonized) or unseen='batch' (estimate the site effect from those rows)."
                )
        sd = np.sqrt(self.var_pooled_)
        mod = C @ self.beta_covariates_
        s = (X_ - self.grand_mean_ - mod) / sd
        out = s.copy()
        for i, lev in enumerate(self.sites_):
            rows = site_str == lev
            if rows.any():
                out[rows] = (s[rows] - self.gamma_star_[i]) / np.sqrt(self.delta_star_[i])
        if not known.all() and unseen == "batch":
            active = ~self.constant_features_
            for lev in sorted(str(v) for v in set(site_str[~known])):
                rows = site_str == lev
                if rows.sum() < 2:
                    raise ValueError(
                        f"unseen='batch' estimates the effect of new site {lev!r} from its rows "
                        f"in X, but X has only {int(rows.sum())} row of it; at least 2 are "
                        "needed."
                    )
                warnings.warn(
                    f"site {lev!r} was not seen in fit; its ComBat location/scale is estimated "
                    f"from the {int(rows.sum())} rows of it in this batch (unseen='batch').",
                    ComBatWarning,
                    stacklevel=2,
                )
                sa = s[rows][:, active]
                gs, ds = self._eb(sa, *self._site_moments(sa))
                block = s[rows]
                block[:, active] = (sa - gs) / np.sqrt(ds)
                out[rows] = block
        out = out * sd + self.grand_mean_ + mod
        if cov_df is not None and self.covariates:
            passthrough = X[list(self.covariates)].to_numpy()
            try:
                passthrough = passthrough.astype(np.float64)
            except (TypeError, ValueError):
                return np.hstack([out.astype(object), passthrough])
            out = np.hstack([out, passthrough])
        return out

    def fit_transform(self, X, y=None, *, sample_domain=None, sample_covariates=None):
        """Fit, then transform the same rows (equals ``neuroCombat`` on these data)."""
        return self.fit(
            X, y, sample_domain=sample_domain, sample_covariates=sample_covariates
        ).transform(X, sample_domain=sample_domain, sample_covariates=sample_covariates)

    def get_feature_names_out(self, input_features=None):
        """Names of the harmonized features, then the passed-through covariates."""
        check_is_fitted(self, "gamma_star_")
        names = list(self._fit_feature_cols)
        if self.covariates and hasattr(self, "feature_names_in_"):
            names += [str(c) for c in self.covariates]
        return np.asarray(names, dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True
        return tags
