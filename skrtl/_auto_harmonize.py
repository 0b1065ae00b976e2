"""Choose a harmonizer for a new site from its unlabelled images.

A harmonizer that helps on one scanner shift can hurt on the next (AdaBN on a shift too small to
matter, or on images whose content the shift destroyed; histogram matching of noisy images),
and a user with only unlabelled images of the new site cannot measure which.
:class:`AutoHarmonizer` fits every candidate (no adaptation, AdaBN, histogram matching, ComBat
fitted with the target site, skada adapters) on labelled source images and unlabelled target
images, measures each with criteria that use no target label, and keeps the first candidate,
in order of preference, that the criteria clearly support; otherwise no adaptation. The first
candidate by default is the *consensus* of the two witnesses, AdaBN and ComBat: the mean of
their log-probabilities (a ranking both corrections agree on wins; one member's mistake is
halved), which the development grid favoured over either member alone (``docs/benchmarks.md``).
The choice,
every candidate's criteria and the reason are fitted attributes (``choice_``, ``scores_``,
``reason_``).

The criteria (``scores_`` columns), on the final features of each candidate:

``source_auc``
    Cross-validated AUC of the estimator on the (harmonized) source features: a harmonizer
    that destroys class information also "aligns" the domains, so it must not lower it.
``mmd``, ``mmd_p``
    Source-target discrepancy of the final features: squared MMD and its permutation p-value
    (:func:`skrtl._base.measure_shift`).
``agreement``
    Spearman correlation between the candidate's decision scores of the target images and
    those of no adaptation: 1 means the candidate changes no ranking.
``corroboration``, ``corroborated_by``
    Mean Spearman correlation of the candidate's target scores with those of the
    *witnesses* (``witnesses``: AdaBN and ComBat, two independent mechanisms, one in the
    network and one on the features), minus ``agreement``: positive when the candidate moved
    the target predictions the way the other mechanism moved them, rather than staying with,
    or moving away from, the unadapted predictions in its own direction. AdaBN is
    corroborated by ComBat, ComBat by AdaBN, any other candidate by both; without a fitted
    witness other than itself, a candidate is corroborated by all other candidates.
``score_ks``, ``entropy``
    Reported, not used: the Kolmogorov-Smirnov distance between the standardised target
    scores and the out-of-fold source scores, and the mean entropy of the target
    predictions (Morerio et al. 2018).

The rule (thresholds chosen on the development grid of ``benchmarks/bench_shift_suite.py``,
never on its reported grid; see ``docs/harmonization.md``):

1. no adaptation unless the unadapted features are shifted: squared MMD at least
   ``min_shift`` and significant at ``shift_alpha``;
2. a candidate must keep the source AUC (within ``max_source_loss``) and remove at least
   ``min_shift_reduction`` of the squared MMD;
3. every candidate must be corroborated (``corroboration > min_corroboration``); ComBat
   must also change the predictions at all (``agreement < max_agreement``);
4. the consensus passes when it keeps the source AUC and at least one of its members passes
   rules 2-3 on its own;
5. the first candidate of ``candidates`` that passes is chosen; when none passes, or when
   the witnesses disagree, no adaptation.
"""

from __future__ import annotations

import copy
import hashlib
import pickle
import time
import warnings
from numbers import Integral, Real

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.base import BaseEstimator, ClassifierMixin, MetaEstimatorMixin, clone
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from ._adabn import AdaBN
from ._base import (
    DEFAULT_SITE_COLUMN,
    HarmonizationWarning,
    measure_shift,
    resolve_unseen,
    site_labels,
    unseen_constraint,
)
from ._combat import ComBatHarmonizer
from ._domain_adaptation import DA_ADAPTERS, DomainAdapter, import_skada
from ._harmonize import HistogramMatcher
from ._imaging import make_image_frame
from .utils import LRUCache, derive_seed, fingerprint, hash_array, root_seed

__all__ = ["HARMONIZER_CANDIDATES", "AutoHarmonizer"]

_SOURCE = "__source__"
_TARGET = "__target__"
_COL = "site"  # the site column of the frames handed to the candidates

#: Candidate harmonizers of :class:`AutoHarmonizer`: name -> description. Every mapping
#: adapter of :data:`skrtl.DA_ADAPTERS` is a candidate too.
HARMONIZER_CANDIDATES: dict[str, str] = {
    "none": "no adaptation",
    "adabn": "AdaBN, source-anchored statistics (source_stats='match')",
    "adabn_recompute": "AdaBN, every domain normalised by its own moments ('recompute')",
    "adabn_keep": "AdaBN, network statistics for the source, own moments for the target",
    "histogram": "HistogramMatcher (per image) in front of the features",
    "histogram_adabn": "HistogramMatcher, then AdaBN ('match') on the matched images",
    "combat": "ComBatHarmonizer on the features, fitted with the target site",
    "coral": "skada CORAL on the features (source recoloured with the target covariance)",
    "subspace_alignment": "skada subspace alignment on the features (at most 32 components)",
    "consensus": "AdaBN and ComBat together: the mean of their log-probabilities (the witnesses)",
}
_ADABN = {
    "adabn": ("match", False),
    "adabn_recompute": ("recompute", False),
    "adabn_keep": ("keep", False),
    "histogram_adabn": ("match", True),
}
# in order of preference (the rule takes the first that passes), from the development grid
# (subspace alignment and classic AdaBN lowered the AUC on average on the development grids:
# they are candidates by name only)
_DEFAULT_CANDIDATES = ("none", "consensus", "adabn", "combat", "histogram", "coral")
# per-feature location / scale corrections: they keep the ranking of each feature within a
# site and cannot invent structure, so they only need to change the predictions
_LOCATION_SCALE = ("combat",)
_NETWORK = ("adabn", "adabn_recompute", "adabn_keep", "histogram_adabn")


# process-wide, content-keyed: source-side AdaBN fits and source cross-validations, which do not
# depend on the target images (a grid of target sites or shifts reuses them)
_SOURCE_CACHE = LRUCache(max_items=16)


def _content_key(*parts) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        if isinstance(part, np.ndarray):
            hash_array(h, part)
        elif isinstance(part, pd.DataFrame):
            for col in part.columns:
                h.update(repr(col).encode())
                for v in part[col]:
                    if isinstance(v, np.ndarray):
                        hash_array(h, v)
                    else:
                        h.update(repr(v).encode())
        elif isinstance(part, bytes):
            h.update(part)
        else:
            h.update(repr(part).encode())
    return h.digest()


def _mapping_adapters() -> list[str]:
    return sorted(k for k, (_, kind, _) in DA_ADAPTERS.items() if kind == "mapping")


def _default_features():
    from ._features import PretrainedCNNFeatures

    return PretrainedCNNFeatures()


def _default_estimator():
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=5000))


def _n_rows(X) -> int:
    return len(X) if hasattr(X, "__len__") else np.asarray(X).shape[0]


def _frame(X, labels) -> pd.DataFrame:
    """An image frame of ``X`` whose ``site`` column holds ``labels``."""
    if isinstance(X, pd.DataFrame):
        out = X.copy()
        out[_COL] = np.asarray(labels, dtype=object)
        return out
    frame = make_image_frame(X)
    frame[_COL] = np.asarray(labels, dtype=object)
    return frame


def _subsample(labels, max_rows, seed) -> np.ndarray:
    """Sorted row indices: at most ``max_rows`` random rows of every label."""
    rng = np.random.default_rng(seed)
    keep = []
    for lab in sorted(set(labels)):
        rows = np.flatnonzero(labels == lab)
        if max_rows is not None and rows.size > max_rows:
            rows = rng.choice(rows, max_rows, replace=False)
        keep.append(rows)
    return np.sort(np.concatenate(keep))


def _scores(est, F) -> np.ndarray:
    """Decision scores ``(n,)`` (binary) or ``(n, k)`` of a fitted classifier."""
    if hasattr(est, "decision_function"):
        return np.asarray(est.decision_function(F), dtype=np.float64)
    proba = np.clip(np.asarray(est.predict_proba(F), dtype=np.float64), 1e-7, 1 - 1e-7)
    if proba.shape[1] == 2:
        return np.log(proba[:, 1] / proba[:, 0])
    return np.log(proba)


def _auc(y, scores, classes) -> float:
    if scores.ndim == 1:
        return float(roc_auc_score(y == classes[1], scores))
    return float(roc_auc_score(y, scores, multi_class="ovr", labels=classes))


def _shape_distance(source_scores, target_scores) -> float:
    """Largest KS distance between the standardised score distributions (over columns)."""
    s = source_scores.reshape(len(source_scores), -1)
    t = target_scores.reshape(len(target_scores), -1)
    out = 0.0
    for j in range(s.shape[1]):
        a = (s[:, j] - s[:, j].mean()) / (s[:, j].std() + 1e-12)
        b = (t[:, j] - t[:, j].mean()) / (t[:, j].std() + 1e-12)
        out = max(out, float(stats.ks_2samp(a, b).statistic))
    return out


def _agreement(a, b) -> float:
    """Spearman correlation of two candidates' target scores (mean over score columns)."""
    a = a.reshape(len(a), -1)
    b = b.reshape(len(b), -1)
    if a.shape[1] == 2 and b.shape[1] == 2:  # binary log-probabilities: one column suffices
        a, b = a[:, 1:], b[:, 1:]
    rho = [stats.spearmanr(a[:, j], b[:, j]).statistic for j in range(a.shape[1])]
    return float(np.nanmean(rho)) if np.isfinite(rho).any() else 0.0


def _entropy(est, F) -> float:
    proba = np.clip(np.asarray(est.predict_proba(F), dtype=np.float64), 1e-12, 1.0)
    return float(np.mean(-(proba * np.log(proba)).sum(axis=1)))


class _Route:
    """A fitted harmonization route: image step, feature extractor, feature step."""

    def __init__(self, name, image_step, extractor, feature_step, feature_names):
        self.name = name
        self.image_step = image_step
        self.extractor = extractor
        self.feature_step = feature_step
        self.feature_names = feature_names

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        X = frame if self.image_step is None else self.image_step.transform(frame)
        F = np.asarray(self.extractor.transform(X), dtype=np.float64)
        if self.feature_step is None:
            return F
        df = pd.DataFrame(F, columns=self.feature_names, index=frame.index)
        df[_COL] = frame[_COL].to_numpy()
        return np.asarray(self.feature_step.transform(df), dtype=np.float64)


class _ConsensusRoute:
    """The routes of the consensus members side by side: their features, concatenated."""

    def __init__(self, name, routes):
        self.name = name
        self.routes = list(routes)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        return np.hstack([route.transform(frame) for route in self.routes])


class _Consensus:
    """Fitted member classifiers, each on its own block of columns: mean log-probabilities.

    For a binary logistic model the mean log-odds, i.e. the normalised geometric mean of the
    members' probabilities (a product of experts): a ranking that two independent corrections
    agree on wins, and one member's mistake is halved rather than taken whole.
    """

    def __init__(self, estimators, widths, classes):
        self.estimators = list(estimators)
        self.widths = [int(w) for w in widths]
        self.classes_ = np.asarray(classes)

    def _log_proba(self, F) -> np.ndarray:
        F = np.asarray(F)
        logs, start = [], 0
        for est, width in zip(self.estimators, self.widths, strict=True):
            p = np.asarray(est.predict_proba(F[:, start : start + width]), dtype=np.float64)
            logs.append(np.log(np.clip(p, 1e-12, 1.0)))
            start += width
        return np.mean(logs, axis=0)

    def predict_proba(self, F) -> np.ndarray:
        log = self._log_proba(F)
        log -= log.max(axis=1, keepdims=True)
        p = np.exp(log)
        return p / p.sum(axis=1, keepdims=True)

    def decision_function(self, F) -> np.ndarray:
        log = self._log_proba(F)
        if log.shape[1] == 2:
            return log[:, 1] - log[:, 0]
        return log - log.mean(axis=1, keepdims=True)

    def predict(self, F) -> np.ndarray:
        return self.classes_[np.argmax(self._log_proba(F), axis=1)]


class AutoHarmonizer(MetaEstimatorMixin, ClassifierMixin, BaseEstimator):
    """Pick a harmonizer for unlabelled target images with criteria that use no target label.

    ``fit(X, y, X_target=X_new_site)`` fits the feature transformer on the labelled source
    images, builds every candidate harmonization (``candidates``), fits a clone of
    ``estimator`` on each candidate's source features and measures the candidates with
    criteria that use no target label. The candidate kept (``choice_``) is the first, in the
    order of ``candidates``, that keeps the source cross-validated AUC, removes most of the
    source-target discrepancy and is corroborated by the witnesses (AdaBN by ComBat, ComBat
    by AdaBN); without a measurable shift, or when no candidate passes, it is ``"none"``.
    The default first candidate, ``"consensus"``, averages the log-probabilities of the two
    witnesses' estimators; it passes when one of them passes on its own and it keeps the
    source AUC.
    The rule is given in the module documentation and in ``docs/harmonization.md``.
    ``predict`` / ``predict_proba`` / ``decision_function`` / ``transform`` run each row
    through the chosen harmonization (target rows through its target side, rows of source
    sites through its source side) and the estimator.

    Parameters
    ----------
    features : transformer, default=None
        Image -> feature transformer (:class:`~skrtl.PretrainedCNNFeatures` by default). The
        AdaBN candidates need one that runs a torch network (the protocol of
        :class:`skrtl._base.TorchNetworkMixin`); with another transformer (e.g.
        :class:`~skrtl.RadiomicsFeatures`) they are skipped.
    estimator : classifier, default=None
        Fitted on the harmonized source features; ``StandardScaler`` + ``LogisticRegression(
        C=0.05)`` by default. It needs ``predict_proba``.
    candidates : "auto" or list of str, default="auto"
        Names of :data:`HARMONIZER_CANDIDATES` (``"none"``, ``"adabn"``,
        ``"adabn_recompute"``, ``"adabn_keep"``, ``"histogram"``, ``"histogram_adabn"``,
        ``"combat"``, ``"coral"``, ``"subspace_alignment"``) or of the mapping adapters of
        :data:`skrtl.DA_ADAPTERS`, in order of preference: the first that passes the rule is
        chosen. ``"none"`` is always a candidate. ``"consensus"`` is the mean of the
        log-probabilities of the witnesses (fitted for it even when not candidates; its
        features, for ``transform``, are theirs side by side). ``"auto"``: ``["consensus",
        "adabn", "combat", "histogram", "coral"]`` (``"subspace_alignment"`` and
        ``"adabn_recompute"`` lowered
        the AUC on average on the development grids; ``"adabn_keep"`` is meant for networks
        whose statistics already are the source's, such as a fine-tuned classifier). A
        candidate is corroborated by the witnesses other than itself (or by the other
        candidates), so it needs at least one other.
    site_column : str or None, default="site"
        Column of the image frames holding each row's site (the routed ``sample_domain`` /
        ``target_domain`` take precedence). Without site labels the source rows form one site
        and ``X_target`` another; at predict time rows without a site are then target rows.
    unseen : {"error", "reference", "batch"}, default="error"
        A row of a site that was neither source nor target in ``fit``: raise; treat it as a
        source row (``"reference"``); or adapt to its rows in the batch (``"batch"``, where the
        chosen harmonizer supports it, with a :class:`~skrtl.HarmonizationWarning`).
    cv : int, default=5
        Stratified folds of the source cross-validation.
    min_shift : float, default=0.03
        No candidate is considered unless the squared MMD between the unadapted source and
        target features is at least this (smaller shifts cost the probe little, and adapting
        to them cost more than it gained on the development grid).
    shift_alpha : float, default=0.05
        ... and significant at this level (permutation test).
    max_source_loss : float, default=0.01
        A candidate whose source cross-validated AUC is lower than that of ``"none"`` by more
        than this is rejected.
    min_shift_reduction : float, default=0.5
        A candidate must remove at least this fraction of the unadapted squared MMD.
    min_corroboration : float, default=0.0
        Every candidate needs ``corroboration`` above this.
    max_agreement : float, default=0.95
        ComBat also needs ``agreement`` (with the unadapted target scores) below this.
    witnesses : list of str, default=("adabn", "combat")
        Candidates whose target predictions corroborate the others (fitted when they are in
        ``candidates`` or ``compare``, or when ``"consensus"`` is), and the members of
        ``"consensus"``.
    compare : list of str or None, default=None
        More candidate names, fitted and scored (``scores_``, and kept with
        ``keep_candidates=True``) for comparison but never chosen.
    max_images : int or None, default=256
        At most this many random source and target images per site for the AdaBN statistics
        and the discrepancy measures (every row is still transformed).
    keep_candidates : bool, default=False
        Keep every fitted candidate (``candidates_``), so that ``predict_proba(X,
        candidate=name)`` compares them; otherwise only the chosen one is kept.
    random_state : int, RandomState instance or None, default=None
        Seeds the folds, the subsamples and the permutation tests.
    verbose : int, default=0
        ``> 0``: a progress bar over the candidates.

    Attributes
    ----------
    choice_ : str
        The chosen candidate.
    reason_ : str
        Why, in words.
    scores_ : pandas.DataFrame
        One row per candidate, in the order of ``candidates``: ``status`` (``"ok"``,
        ``"skipped: ..."`` or ``"failed: ..."``), the criteria (``source_auc``,
        ``source_auc_change``, ``mmd``, ``mmd_p``, ``mmd_reduction``, ``agreement``,
        ``corroboration``, ``corroborated_by``, ``score_ks``, ``entropy``), ``seconds``,
        ``verdict`` (why it passed or failed the rule) and ``chosen``; then the ``compare``
        candidates.
    features_ : transformer
        The fitted feature transformer.
    estimator_ : classifier
        The estimator fitted on the chosen candidate's source features.
    candidates_ : dict
        ``keep_candidates=True``: candidate name -> fitted route.
    classes_ : ndarray
    source_sites_, target_sites_ : list of str
    n_features_out_ : int
        Features handed to the estimator by the chosen harmonization.

    Notes
    -----
    The target images are a fit parameter (``fit(X, y, X_target=...)``; in a Pipeline
    ``autoharmonizer__X_target=...``, in :func:`~sklearn.model_selection.cross_validate`
    ``params={"X_target": ...}``), like :class:`~skrtl.AdaBN`'s: they carry no label, so the
    CV does not split them. Their labels are never used, nor asked for. The criteria are
    estimates: where they cannot tell, the choice is ``"none"``; read ``scores_`` and
    ``reason_``. When a candidate increased the measured source-target discrepancy or lowered
    the source AUC, ``fit`` issues one :class:`~skrtl.HarmonizationWarning` naming them (they
    are not chosen); when the target features are shifted but no candidate passed the rule,
    another one (the target predictions are then unadapted). One choice is made for all
    target sites together: fit one selector per target site when their scanners differ.

    Examples
    --------
    >>> from skrtl import AutoHarmonizer, PretrainedCNNFeatures
    >>> auto = AutoHarmonizer(PretrainedCNNFeatures(input_size=64), random_state=0)
    >>> # auto.fit(X_site_a, y_site_a, X_target=X_site_b)   # image frames with a site column
    >>> # auto.choice_, auto.reason_, auto.scores_
    """

    _parameter_constraints: dict = {
        "features": [HasMethods(["fit", "transform"]), None],
        "estimator": [HasMethods(["fit", "predict_proba"]), None],
        "candidates": [StrOptions({"auto"}), list, tuple],
        "site_column": [str, None],
        "unseen": unseen_constraint(),
        "cv": [Interval(Integral, 2, None, closed="left")],
        "min_shift": [Interval(Real, None, None, closed="neither")],
        "shift_alpha": [Interval(Real, 0, 1, closed="both")],
        "max_source_loss": [Interval(Real, 0, None, closed="left")],
        "min_shift_reduction": [Interval(Real, 0, 1, closed="both")],
        "min_corroboration": [Interval(Real, None, None, closed="neither")],
        "max_agreement": [Interval(Real, None, None, closed="neither")],
        "witnesses": [list, tuple],
        "compare": [list, tuple, None],
        "max_images": [Interval(Integral, 8, None, closed="left"), None],
        "keep_candidates": ["boolean"],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        features=None,
        estimator=None,
        *,
        candidates="auto",
        site_column=DEFAULT_SITE_COLUMN,
        unseen="error",
        cv=5,
        min_shift=0.03,
        shift_alpha=0.05,
        max_source_loss=0.01,
        min_shift_reduction=0.5,
        min_corroboration=0.0,
        max_agreement=0.95,
        witnesses=("adabn", "combat"),
        compare=None,
        max_images=256,
        keep_candidates=False,
        random_state=None,
        verbose=0,
    ):
        self.features = features
        self.estimator = estimator
        self.candidates = candidates
        self.site_column = site_column
        self.unseen = unseen
        self.cv = cv
        self.min_shift = min_shift
        self.shift_alpha = shift_alpha
        self.max_source_loss = max_source_loss
        self.min_shift_reduction = min_shift_reduction
        self.min_corroboration = min_corroboration
        self.max_agreement = max_agreement
        self.witnesses = witnesses
        self.compare = compare
        self.max_images = max_images
        self.keep_candidates = keep_candidates
        self.random_state = random_state
        self.verbose = verbose

    # ----------------------------------------------------------------------------------------
    def _candidate_names(self) -> list[str]:
        known = set(HARMONIZER_CANDIDATES) | set(_mapping_adapters())
        names = []
        for c in [*self._choosable(), *(self.compare or ())]:
            if not isinstance(c, str) or c not in known:
                raise ValueError(
                    f"candidates holds {c!r}, which is not a candidate name; use names of "
                    f"{sorted(known)!r} (or candidates='auto')."
                )
            if c not in names:
                names.append(c)
        if "none" in names:
            names.remove("none")
        if "consensus" in names:  # its members are fitted (compared only, unless candidates)
            at = names.index("consensus")
            for w in self.witnesses:
                if isinstance(w, str) and w in known and w not in names and w != "none":
                    names.insert(at, w)
                    at += 1
        return ["none", *names]

    def _choosable(self) -> list[str]:
        if isinstance(self.candidates, str):
            return list(_DEFAULT_CANDIDATES)
        return list(self.candidates)

    def _labels(self, X, sample_domain, default, name):
        labels = site_labels(
            X, site_column=self.site_column, sample_domain=sample_domain, name=name
        )
        if labels is None:
            labels = np.full(_n_rows(X), default, dtype=object)
        return labels

    @staticmethod
    def _has_network(est) -> bool:
        return all(
            callable(getattr(est, h, None)) for h in ("_skrtl_torch_module", "_skrtl_iter_inputs")
        )

    @staticmethod
    def _adapter(name, ctx):
        if name == "subspace_alignment":
            skada = import_skada()
            k = min(32, ctx["F_source"].shape[1], len(ctx["F_source"]), len(ctx["F_target"]))
            return skada.SubspaceAlignmentAdapter(n_components=k, random_state=0)
        return name

    # ----------------------------------------------------------------------------------------
    def _build(self, name, ctx) -> _Route:
        """Fit candidate ``name`` and return its route."""
        unseen = ctx["unseen"]
        if name == "none":
            return _Route(name, None, self.features_, None, None)
        if name in _ADABN or name == "histogram":
            image_step, extractor = None, self.features_
            src, tgt = ctx["source_sub"], ctx["target_sub"]
            if name in ("histogram", "histogram_adabn"):
                image_step = ctx.get("histogram")
                if image_step is None:
                    image_step = HistogramMatcher(unseen="reference", check_shift=False)
                    image_step.fit(ctx["source"])
                    ctx["histogram"] = image_step
                    ctx["histogram_features"] = clone(self._features_param()).fit(
                        image_step.transform(ctx["source"]), ctx["y"]
                    )
                extractor = ctx["histogram_features"]
                src, tgt = image_step.transform(src), image_step.transform(tgt)
            if name in _ADABN:
                stats_mode, _ = _ADABN[name]
                ada = AdaBN(
                    FrozenEstimator(extractor),
                    site_column=_COL,
                    source_stats=stats_mode,
                    unseen=unseen,
                    check_shift=False,
                )
                key = _content_key(
                    "adabn",
                    stats_mode,
                    unseen,
                    type(extractor).__name__,
                    fingerprint(extractor._skrtl_torch_module()),
                    pickle.dumps(clone(self._features_param())),
                    src,
                    ctx["y_sub"],
                )
                cached = _SOURCE_CACHE.get(key)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", HarmonizationWarning)
                    if cached is None:
                        ada.fit(src, ctx["y_sub"])
                        _SOURCE_CACHE.put(key, copy.deepcopy(ada))
                    else:
                        ada = copy.deepcopy(cached)
                    extractor = ada.adapt(tgt)
            return _Route(name, image_step, extractor, None, None)
        # feature-level candidates on the unadapted features
        names = ctx["feature_names"]
        df = pd.DataFrame(np.vstack([ctx["F_source"], ctx["F_target"]]), columns=names)
        df[_COL] = np.r_[ctx["source_labels"], ctx["target_labels"]]
        if name == "combat":
            step = ComBatHarmonizer(site_column=_COL, unseen=unseen, check_shift=False).fit(df)
        else:
            step = DomainAdapter(
                self._adapter(name, ctx),
                site_column=_COL,
                target_sites=list(self.target_sites_),
                per_site=True,
                unseen=unseen,
                check_shift=False,
            ).fit(df)
        return _Route(name, None, self.features_, step, names)

    def _source_fit(self, S, y, seed):
        """Estimator fitted on ``S`` and its out-of-fold scores (cached by content)."""
        base = self._base_estimator()
        key = _content_key("source", S, y, pickle.dumps(clone(base)), self._n_splits, seed)
        hit = _SOURCE_CACHE.get(key)
        if hit is not None:
            return copy.deepcopy(hit[0]), hit[1]
        est = clone(base).fit(S, y)
        folds = StratifiedKFold(
            n_splits=self._n_splits, shuffle=True, random_state=derive_seed(seed, "cv")
        )
        method = "decision_function" if hasattr(est, "decision_function") else "predict_proba"
        oof = cross_val_predict(clone(base), S, y, cv=folds, method=method)
        oof = np.asarray(oof, dtype=np.float64)
        if method == "predict_proba":
            p = np.clip(oof, 1e-7, 1 - 1e-7)
            oof = np.log(p[:, 1] / p[:, 0]) if p.shape[1] == 2 else np.log(p)
        _SOURCE_CACHE.put(key, (est, oof))
        return est, oof

    def _criteria(self, S, T, y, seed):
        """Criteria of one candidate from its source and target features."""
        seed = derive_seed(seed, "criteria")
        est, oof = self._source_fit(S, y, seed)
        return (est, *self._measure(est, oof, S, T, y, seed))

    def _measure(self, est, oof, S, T, y, seed):
        """The criteria row, target scores and out-of-fold source scores of a fitted route."""
        t_scores = _scores(est, T)
        rows_s = self._sub_source
        rows_t = self._sub_target
        mmd, mmd_p, _ = measure_shift(
            S[rows_s], T[rows_t], max_samples=len(rows_s) + len(rows_t), random_state=seed
        )
        crit = {
            "source_auc": _auc(y, oof, self.classes_),
            "mmd": mmd,
            "mmd_p": mmd_p,
            "score_ks": _shape_distance(oof, t_scores),
            "entropy": _entropy(est, T),
        }
        return crit, t_scores, oof

    def _consensus_members(self, fitted) -> list[str]:
        return [w for w in dict.fromkeys(self.witnesses) if w != "none" and w in fitted]

    def _consensus(self, members, fitted, routes, ests, y, seed):
        """Route, estimator and criteria of the consensus of the fitted ``members``.

        Its source out-of-fold scores are the mean of the members' (each member's estimator
        cross-validated on its own features); its features are the members' side by side.
        """
        seed = derive_seed(seed, "criteria")
        S = np.hstack([fitted[m][0] for m in members])
        T = np.hstack([fitted[m][1] for m in members])
        oof = np.mean([fitted[m][2] for m in members], axis=0)
        widths = [fitted[m][0].shape[1] for m in members]
        est = _Consensus([ests[m] for m in members], widths, self.classes_)
        route = _ConsensusRoute("consensus", [routes[m] for m in members])
        crit, t_scores, oof = self._measure(est, oof, S, T, y, seed)
        return route, est, crit, t_scores, oof

    def _features_param(self):
        return self.features if self.features is not None else _default_features()

    def _base_estimator(self):
        return self.estimator if self.estimator is not None else _default_estimator()

    # ----------------------------------------------------------------------------------------
    def fit(self, X, y, *, X_target=None, sample_domain=None, target_domain=None):
        """Fit every candidate on ``X`` (labelled) and ``X_target`` (unlabelled); choose one.

        Parameters
        ----------
        X : ndarray or image frame
            Labelled source images (an image frame with a site column to keep several source
            sites apart).
        y : array-like of shape (n_samples,)
            Class labels of the source images.
        X_target : ndarray or image frame
            Unlabelled images of the target site(s).
        sample_domain : array-like of shape (n_samples,), optional
            Site of each source row, instead of the site column.
        target_domain : array-like of shape (n_target,), optional
            Site of each target row, instead of the site column of ``X_target``.

        Returns
        -------
        self
        """
        self._validate_params()
        unseen = resolve_unseen(self.unseen, type(self).__name__)
        if X_target is None:
            raise ValueError(
                "AutoHarmonizer chooses a harmonizer for unlabelled target images: pass them "
                "as fit(X, y, X_target=...) (in a Pipeline: step__X_target=..., in "
                "cross_validate: params={'X_target': ...})."
            )
        if y is None:
            raise ValueError("AutoHarmonizer needs the class labels y of the source images.")
        y = np.asarray(y)
        n = _n_rows(X)
        if y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"y must have shape ({n},) (one label per image), got {y.shape!r}.")
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if self.classes_.size < 2:
            raise ValueError(
                f"y holds only the class {self.classes_.tolist()!r}; a classifier needs at "
                "least 2 classes."
            )
        counts = np.unique(y, return_counts=True)[1]
        self._n_splits = int(min(self.cv, counts.min()))
        if self._n_splits < 2:
            raise ValueError(
                "every class needs at least 2 source images for the cross-validated criteria; "
                f"the rarest has {int(counts.min())}."
            )
        if _n_rows(X_target) < 2:
            raise ValueError("X_target needs at least 2 unlabelled target images.")
        src_labels = self._labels(X, sample_domain, _SOURCE, "AutoHarmonizer")
        tgt_labels = self._labels(X_target, target_domain, _TARGET, "AutoHarmonizer")
        clash = sorted(set(src_labels) & set(tgt_labels))
        if clash:
            raise ValueError(
                f"X_target holds images of the source sites {clash!r}; the target images must "
                "come from other sites (label them as their own site)."
            )
        seed = root_seed(self.random_state)
        self.source_sites_ = sorted(set(src_labels))
        self.target_sites_ = sorted(set(tgt_labels))
        source = _frame(X, src_labels)
        target = _frame(X_target, tgt_labels)
        sub_s = _subsample(src_labels, self.max_images, derive_seed(seed, "source"))
        sub_t = _subsample(tgt_labels, self.max_images, derive_seed(seed, "target"))
        self._sub_source, self._sub_target = sub_s, sub_t

        self.features_ = clone(self._features_param()).fit(source, y)
        F_s = np.asarray(self.features_.transform(source), dtype=np.float64)
        F_t = np.asarray(self.features_.transform(target), dtype=np.float64)
        try:
            feature_names = [str(c) for c in self.features_.get_feature_names_out()]
        except (AttributeError, ValueError):
            feature_names = [f"f{i}" for i in range(F_s.shape[1])]
        ctx = {
            "unseen": unseen,
            "source": source,
            "y": y,
            "source_sub": source.iloc[sub_s],
            "y_sub": y[sub_s],
            "target_sub": target.iloc[sub_t],
            "F_source": F_s,
            "F_target": F_t,
            "feature_names": feature_names,
            "source_labels": src_labels,
            "target_labels": tgt_labels,
        }
        names = self._candidate_names()
        known = set(HARMONIZER_CANDIDATES) | set(_mapping_adapters())
        bad = [w for w in self.witnesses if not isinstance(w, str) or w not in known]
        if bad:
            raise ValueError(
                f"witnesses holds {bad!r}, which are not candidate names; use names of "
                f"{sorted(known)!r} (e.g. witnesses=('adabn', 'combat'))."
            )
        network = self._has_network(self.features_)
        rows, routes, ests, target_scores, fitted = {}, {}, {}, {}, {}
        from tqdm.auto import tqdm

        # the consensus averages fitted members: it comes last, its row keeps its place
        order = [n for n in names if n != "consensus"] + [n for n in names if n == "consensus"]
        for name in tqdm(order, disable=not self.verbose, desc="AutoHarmonizer", unit="cand"):
            row = {"candidate": name}
            started = time.perf_counter()
            if name in _NETWORK and not network:
                row["status"] = f"skipped: {type(self.features_).__name__} runs no torch network"
                rows[name] = row
                continue
            if name == "consensus":
                members = self._consensus_members(fitted)
                if len(members) < 2:
                    row["status"] = (
                        f"skipped: needs two fitted witnesses (witnesses={self.witnesses!r}; "
                        f"fitted: {members!r})"
                    )
                    rows[name] = row
                    continue
            try:
                if name == "none":
                    route, S, T = _Route(name, None, self.features_, None, None), F_s, F_t
                    est, crit, t_scores, oof = self._criteria(S, T, y, seed)
                elif name == "consensus":
                    route, est, crit, t_scores, oof = self._consensus(
                        members, fitted, routes, ests, y, seed
                    )
                    S = T = None
                else:
                    route = self._build(name, ctx)
                    S, T = route.transform(source), route.transform(target)
                    est, crit, t_scores, oof = self._criteria(S, T, y, seed)
            except Exception as exc:  # a failing candidate is reported, the others go on
                if name == "none":
                    raise
                row["status"] = f"failed: {type(exc).__name__}: {exc}"
                rows[name] = row
                continue
            row.update(status="ok", **crit, seconds=time.perf_counter() - started)
            rows[name] = row
            routes[name], ests[name], target_scores[name] = route, est, t_scores
            fitted[name] = (S, T, oof)
        table = pd.DataFrame([rows[n] for n in names]).set_index("candidate")
        self._add_agreement(table, target_scores)
        self.choice_, self.reason_, table = self._select(table)
        self.scores_ = table
        self._route = routes[self.choice_]
        self.estimator_ = ests[self.choice_]
        self.candidates_ = dict(routes) if self.keep_candidates else {}
        self._estimators = dict(ests) if self.keep_candidates else {}
        self.n_features_out_ = int(np.asarray(self._route.transform(source.iloc[:2])).shape[1])
        self._warn_harmful(table)
        self._warn_uncorrected(table)
        return self

    # ----------------------------------------------------------------------------------------
    def _add_agreement(self, table, target_scores):
        """``agreement`` with no adaptation and ``corroboration`` by the witnesses."""
        table["agreement"] = np.nan
        table["corroboration"] = np.nan
        table["corroborated_by"] = ""
        others = [n for n in target_scores if n != "none"]
        witnesses = [w for w in self.witnesses if w in target_scores and w != "none"]
        for name, scores in target_scores.items():
            table.loc[name, "agreement"] = _agreement(target_scores["none"], scores)
            if name == "none":
                continue
            pool = [w for w in witnesses if w != name] or [o for o in others if o != name]
            if pool:
                mean = np.mean([_agreement(scores, target_scores[o]) for o in pool])
                table.loc[name, "corroboration"] = mean - table.loc[name, "agreement"]
                table.loc[name, "corroborated_by"] = ", ".join(pool)

    def _select(self, table):
        """The chosen candidate, the reason and the table with the decision columns."""
        table = table.copy()
        none = table.loc["none"]
        table["source_auc_change"] = table["source_auc"] - none["source_auc"]
        base = float(none["mmd"])  # a fraction of no shift is meaningless: NaN
        table["mmd_reduction"] = (1.0 - table["mmd"] / base) if base > 0 else np.nan
        table["verdict"] = ""
        table["chosen"] = False
        table.loc["none", "verdict"] = "the default"
        shifted = none["mmd"] >= self.min_shift and none["mmd_p"] < self.shift_alpha
        choosable = set(self._choosable())
        objections = {  # why each fitted candidate fails the rule on its own criteria
            name: self._objections(name, row)
            for name, row in table.iterrows()
            if name not in ("none", "consensus") and row["status"] == "ok"
        }
        if "consensus" in table.index and table.loc["consensus", "status"] == "ok":
            members = [m.strip() for m in table.loc["consensus", "corroborated_by"].split(",")]
            row = table.loc["consensus"]
            why = []
            if row["source_auc_change"] < -self.max_source_loss:
                why.append(f"lowers the source AUC by {-row['source_auc_change']:.3f}")
            if all(objections.get(m) for m in members):
                why.append(
                    "no member passes the rule on its own ("
                    + "; ".join(f"{m}: {'; '.join(objections[m])}" for m in members)
                    + ")"
                )
            objections["consensus"] = why
        choice = None
        for name, row in table.iterrows():
            if name == "none":
                continue
            if name not in choosable:
                table.loc[name, "verdict"] = (
                    "compared only (in compare, not in candidates)"
                    if name in (self.compare or ())
                    else "compared only (a member of the consensus, not in candidates)"
                )
                continue
            if row["status"] != "ok":
                table.loc[name, "verdict"] = row["status"]
                continue
            if not shifted:
                table.loc[name, "verdict"] = "not considered: no shift to correct"
                continue
            why = objections[name]
            if why:
                table.loc[name, "verdict"] = "rejected: " + "; ".join(why)
            elif choice is None:
                choice = name
                table.loc[name, "verdict"] = "chosen"
            else:
                table.loc[name, "verdict"] = f"passes, after {choice!r} in the order"
        shift = f"squared MMD {none['mmd']:.3g}, p = {none['mmd_p']:.3g}"
        if not shifted:
            choice = "none"
            reason = (
                f"none: no source-target shift worth correcting in the unadapted features "
                f"({shift}; adaptation needs a squared MMD >= {self.min_shift} with p < "
                f"{self.shift_alpha})."
            )
        elif choice is None:
            choice = "none"
            rejected = [
                f"{n}: {v.removeprefix('rejected: ')}"
                for n, v in table["verdict"].items()
                if n != "none" and n in choosable
            ]
            reason = (
                f"none: the unadapted features are shifted ({shift}), but no candidate passed "
                f"the rule ({'; '.join(rejected)})."
            )
        elif choice == "consensus":
            c = table.loc[choice]
            members = [m.strip() for m in c["corroborated_by"].split(",")]
            passing = [
                f"{m} (corroboration {table.loc[m, 'corroboration']:+.2f}, removes "
                f"{100 * table.loc[m, 'mmd_reduction']:.0f} % of the shift)"
                for m in members
                if not objections.get(m)
            ]
            reason = (
                f"consensus (the mean log-probabilities of {' and '.join(members)}): the "
                f"unadapted features are shifted ({shift}); {', '.join(passing)} "
                f"{'passes' if len(passing) == 1 else 'pass'} the rule on its own, and the "
                f"consensus keeps the source AUC ({none['source_auc']:.3f} -> "
                f"{c['source_auc']:.3f}) while halving the cost of either member's mistake."
            )
        else:
            c = table.loc[choice]
            support = (
                f"is corroborated by {c['corroborated_by']} ({c['corroboration']:+.2f}: it moves "
                "the target predictions their way)"
            )
            reason = (
                f"{choice} ({HARMONIZER_CANDIDATES.get(choice, choice)}): the unadapted features "
                f"are shifted ({shift}); {choice} keeps the source AUC ({none['source_auc']:.3f} "
                f"-> {c['source_auc']:.3f}), removes {100 * c['mmd_reduction']:.0f} % of the "
                f"shift and {support}."
            )
        table.loc[choice, "chosen"] = True
        return choice, reason, table

    def _objections(self, name, row) -> list[str]:
        """Why candidate ``name`` fails the rule on its own criteria (empty: it passes)."""
        why = []
        if row["source_auc_change"] < -self.max_source_loss:
            why.append(f"lowers the source AUC by {-row['source_auc_change']:.3f}")
        if row["mmd_reduction"] < self.min_shift_reduction:
            why.append(f"removes only {100 * row['mmd_reduction']:.0f} % of the shift")
        if name in _LOCATION_SCALE and not row["agreement"] < self.max_agreement:
            why.append(f"barely changes the predictions (agreement {row['agreement']:.2f})")
        elif not row["corroboration"] > self.min_corroboration:
            cor = row["corroboration"]
            why.append(
                "no other harmonizer to corroborate it"
                if not np.isfinite(cor)
                else f"not corroborated by {row['corroborated_by']} ({cor:+.2f})"
            )
        return why

    def _warn_uncorrected(self, table):
        """Warn when the target site is shifted but no candidate passed the rule."""
        none = table.loc["none"]
        shifted = none["mmd"] >= self.min_shift and none["mmd_p"] < self.shift_alpha
        if shifted and self.choice_ == "none":
            warnings.warn(
                "AutoHarmonizer: the target features are shifted from the source (squared MMD "
                f"{none['mmd']:.3g}, p = {none['mmd_p']:.3g}), but no harmonizer passed the rule "
                "(see reason_): the target predictions are unadapted and may be less accurate "
                "than on the source. Check them on a few labelled target cases.",
                HarmonizationWarning,
                stacklevel=3,
            )

    def _warn_harmful(self, table):
        ok = table[(table["status"] == "ok") & (table.index != "none")]
        none = table.loc["none"]
        harmful = []
        for name, row in ok.iterrows():
            why = []
            if row["mmd"] > none["mmd"] and row["mmd_p"] < self.shift_alpha:
                why.append(f"squared MMD {none['mmd']:.3g} -> {row['mmd']:.3g}")
            if row["source_auc_change"] < -self.max_source_loss:
                why.append(f"source AUC {none['source_auc']:.3f} -> {row['source_auc']:.3f}")
            if why:
                harmful.append(f"{name} ({', '.join(why)})")
        if harmful:
            warnings.warn(
                "AutoHarmonizer: these harmonizers increased the measured source-target "
                "discrepancy or lowered the source cross-validated AUC on these data, and were "
                f"not chosen: {'; '.join(harmful)}. See scores_.",
                HarmonizationWarning,
                stacklevel=3,
            )

    # ----------------------------------------------------------------------------------------
    def _rows_frame(self, X, sample_domain):
        check_is_fitted(self, "choice_")
        labels = site_labels(
            X, site_column=self.site_column, sample_domain=sample_domain, name="AutoHarmonizer"
        )
        n = _n_rows(X)
        if labels is None:
            if len(self.target_sites_) != 1:
                raise ValueError(
                    f"AutoHarmonizer was fitted for the target sites {self.target_sites_!r}; "
                    f"X has no site column (site_column={self.site_column!r}) to tell them "
                    "apart. Pass an image frame with the sites or route sample_domain=..."
                )
            labels = np.full(n, self.target_sites_[0], dtype=object)
        else:
            known = set(self.source_sites_) | set(self.target_sites_)
            new = sorted(set(labels) - known)
            if new and self.unseen == "error":
                raise ValueError(
                    f"sites {new!r} were neither source ({self.source_sites_!r}) nor target "
                    f"({self.target_sites_!r}) in fit. Refit with their unlabelled images as "
                    "X_target, or choose unseen='reference' (treat them as source rows) or "
                    "unseen='batch'."
                )
        return _frame(X, labels)

    def _route_of(self, candidate):
        if candidate is None or candidate == self.choice_:
            return self._route, self.estimator_
        if candidate not in self.candidates_:
            raise ValueError(
                f"candidate={candidate!r} was not kept; kept: {sorted(self.candidates_)!r} "
                "(fit with keep_candidates=True to keep every candidate)."
            )
        return self.candidates_[candidate], self._estimators[candidate]

    def transform(self, X, *, sample_domain=None, candidate=None):
        """Harmonized features of ``X`` (the input of the estimator).

        Parameters
        ----------
        X : ndarray or image frame
        sample_domain : array-like of shape (n_samples,), optional
            Site of each row, instead of the site column.
        candidate : str, optional
            A kept candidate instead of ``choice_`` (``keep_candidates=True``).

        Returns
        -------
        ndarray of shape (n_samples, n_features_out)
        """
        route, _ = self._route_of(candidate)
        return route.transform(self._rows_frame(X, sample_domain))

    def _delegate(self, method, X, sample_domain, candidate):
        route, est = self._route_of(candidate)
        return getattr(est, method)(route.transform(self._rows_frame(X, sample_domain)))

    def predict(self, X, *, sample_domain=None, candidate=None):
        """Class labels through the chosen harmonization (or ``candidate``)."""
        return self._delegate("predict", X, sample_domain, candidate)

    def predict_proba(self, X, *, sample_domain=None, candidate=None):
        """Class probabilities through the chosen harmonization (or ``candidate``)."""
        return self._delegate("predict_proba", X, sample_domain, candidate)

    def decision_function(self, X, *, sample_domain=None, candidate=None):
        """Decision scores through the chosen harmonization (or ``candidate``)."""
        route, est = self._route_of(candidate)
        return _scores(est, route.transform(self._rows_frame(X, sample_domain)))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.target_tags.required = True
        return tags
