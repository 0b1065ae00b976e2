"""Unsupervised domain-adaptation scorers from skada, for model selection with site labels.

A new site comes without labels, so the usual cross-validated accuracy cannot tell which
adaptation (none, ComBat, CORAL, ...) or which hyper-parameter works there. skada's
unsupervised scorers estimate it from the labelled source rows and the unlabelled target rows:
importance-weighted source accuracy (Sugiyama et al. 2007), prediction entropy on the target
(Morerio et al. 2018), soft neighbourhood density (Saito et al. 2021), deep embedded validation
(You et al. 2019), circular validation (Bruzzone & Marconcini 2009), MixVal (Hu et al. 2023) and
MaNo (Xie et al. 2024). They take skada's integer ``sample_domain``; :func:`make_site_da_scorer`
builds it from the site column of ``X`` with the codes of the fitted
:class:`~skrtl.SiteDAPipeline`, and runs the skada scorer on its fitted skada pipeline. The
result is an ordinary ``scorer(estimator, X, y)`` callable for ``cross_validate``,
``GridSearchCV`` or :class:`~skrtl.TransferSearchCV`; greater is better for all of them (skada
negates the losses).
"""

from __future__ import annotations

import sklearn
from sklearn.pipeline import Pipeline

from ._domain_adaptation import SiteDAPipeline, import_skada

__all__ = ["DA_SCORERS", "SiteDAScorer", "make_site_da_scorer"]

# short name -> skada.metrics class name
DA_SCORERS: dict[str, str] = {
    "importance_weighted": "ImportanceWeightedScorer",
    "prediction_entropy": "PredictionEntropyScorer",
    "soft_neighborhood_density": "SoftNeighborhoodDensity",
    "deep_embedded_validation": "DeepEmbeddedValidation",
    "circular_validation": "CircularValidation",
    "mixval": "MixValScorer",
    "mano": "MaNoScorer",
}


def _resolve_scorer(scorer, params: dict):
    skada = import_skada()
    if isinstance(scorer, str):
        if scorer not in DA_SCORERS:
            raise ValueError(
                f"scorer={scorer!r} is not a known skada DA scorer; use one of "
                f"{sorted(DA_SCORERS)!r} or pass a skada.metrics scorer instance."
            )
        with sklearn.config_context(enable_metadata_routing=True):
            return getattr(skada.metrics, DA_SCORERS[scorer])(**params)
    if params:
        raise ValueError(
            f"scorer parameters {sorted(params)!r} are only accepted with a scorer name; set "
            "them on the scorer instance instead."
        )
    if not (callable(scorer) and hasattr(scorer, "_score")):
        raise TypeError(
            f"scorer must be one of {sorted(DA_SCORERS)!r} or a skada.metrics domain-aware "
            f"scorer (e.g. skada.metrics.PredictionEntropyScorer()), got {scorer!r}."
        )
    return scorer


class SiteDAScorer:
    """A skada unsupervised DA scorer that reads the sites from ``X``.

    Made by :func:`make_site_da_scorer`. Calling it as ``scorer(estimator, X, y)``:

    1. ``estimator`` must be a fitted :class:`~skrtl.SiteDAPipeline`, or a fitted
       :class:`~sklearn.pipeline.Pipeline` whose last step is one (its earlier steps, e.g. a CNN
       feature transformer with ``set_output(transform="pandas")``, transform ``X`` first);
    2. :meth:`SiteDAPipeline.encode_domains` turns the rows into skada's view: float features,
       the domain code of each row's site (source ``>= 0``, target ``< 0``, as in ``fit``) and
       the labels with the target rows masked;
    3. the skada scorer runs on the fitted skada pipeline with metadata routing on.

    Target labels are never used, even when ``y`` holds them (sites in ``target_sites``).

    Parameters
    ----------
    scorer : skada.metrics scorer
        The domain-aware scorer.

    Attributes
    ----------
    scorer : skada.metrics scorer
    """

    def __init__(self, scorer):
        self.scorer = scorer

    def __repr__(self) -> str:
        return f"SiteDAScorer({self.scorer!r})"

    def __call__(self, estimator, X, y=None, sample_domain=None):
        """Score ``estimator`` on ``X`` (higher is better).

        Parameters
        ----------
        estimator : SiteDAPipeline or Pipeline ending with one
            Fitted.
        X : DataFrame or array-like
            Rows of source and target sites (a DataFrame with the site column, or an array
            with ``sample_domain``).
        y : array-like of shape (n_samples,)
            Labels of the source rows (target rows' labels are ignored).
        sample_domain : array-like of shape (n_samples,), optional
            Site labels when ``X`` has no site column.

        Returns
        -------
        float
        """
        est = estimator
        if isinstance(est, Pipeline) and not isinstance(est, SiteDAPipeline):
            if not isinstance(est.steps[-1][1], SiteDAPipeline):
                raise TypeError(
                    "SiteDAScorer scores a SiteDAPipeline (or a Pipeline ending with one); the "
                    f"last step here is {type(est.steps[-1][1]).__name__}. Build the models to "
                    "compare with skrtl.make_site_da_pipeline: e.g. make_site_da_pipeline(est) "
                    "for no adaptation, make_site_da_pipeline(ComBatHarmonizer(), est), "
                    "make_site_da_pipeline('coral', est)."
                )
            X = est[:-1].transform(X)
            est = est.steps[-1][1]
        if not isinstance(est, SiteDAPipeline):
            raise TypeError(
                f"SiteDAScorer scores a SiteDAPipeline, got {type(est).__name__}. Wrap the model "
                "with skrtl.make_site_da_pipeline (make_site_da_pipeline(est) for no "
                "adaptation)."
            )
        if y is None:
            raise ValueError(
                "SiteDAScorer needs y with the labels of the source rows (cross_validate passes "
                "it); the target rows' labels may be unknown."
            )
        Xf, codes, y_enc = est.encode_domains(X, y, sample_domain=sample_domain)
        if (codes >= 0).all() or (codes < 0).all():
            raise ValueError(
                "the scored rows hold only "
                f"{'source' if (codes >= 0).all() else 'target'} sites; skada's DA scorers "
                "need rows of source and target sites (use a CV split that keeps both, e.g. "
                "StratifiedKFold over the pooled rows)."
            )
        with sklearn.config_context(enable_metadata_routing=True):
            return float(self.scorer(est.pipeline_, Xf, y_enc, sample_domain=codes))


def make_site_da_scorer(scorer="prediction_entropy", **params) -> SiteDAScorer:
    """An unsupervised skada DA scorer for :class:`~skrtl.SiteDAPipeline` models.

    Parameters
    ----------
    scorer : str or skada.metrics scorer, default="prediction_entropy"
        A name of :data:`DA_SCORERS` (``"importance_weighted"``, ``"prediction_entropy"``,
        ``"soft_neighborhood_density"``, ``"deep_embedded_validation"``,
        ``"circular_validation"``, ``"mixval"``, ``"mano"``) or a skada.metrics scorer instance.
    **params
        Parameters of the named skada scorer (e.g. ``random_state`` for
        ``"deep_embedded_validation"``).

    Returns
    -------
    SiteDAScorer
        A ``scorer(estimator, X, y)`` callable; greater is better.

    Examples
    --------
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.model_selection import cross_validate
    >>> from skrtl import make_site_da_pipeline, make_site_da_scorer
    >>> model = make_site_da_pipeline("coral", LogisticRegression(), target_sites="B")
    >>> scoring = {"entropy": make_site_da_scorer("prediction_entropy")}
    >>> # cross_validate(model, X, y, scoring=scoring)  # X: features + "site" column
    """
    return SiteDAScorer(_resolve_scorer(scorer, params))
