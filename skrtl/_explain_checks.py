"""Sanity checks of saliency maps: the model-randomisation test of Adebayo et al. (2018).

A saliency method that shows the same map for a trained network and for one whose weights were
re-initialised explains the image (edges, bright regions), not the model. Adebayo et al.,
"Sanity checks for saliency maps" (NeurIPS 2018), re-initialise the layers from the output
downwards -- *cascading* (the top ``k`` layers) or *independently* (one layer at a time) -- and
measure how similar the maps stay with the Spearman rank correlation. A method passes when the
correlation drops well below 1 as soon as the top layers are random.

:func:`randomized_copy` re-initialises named transfer layers of a copy of a fitted estimator
(the fitted estimator is never changed); :func:`randomization_test` runs the whole test.
"""

from __future__ import annotations

import copy
from numbers import Integral

import numpy as np
import pandas as pd
import torch

from ._adabn import AdaBN, bn_layers, reestimate_bn_stats
from ._backbone import get_transfer_layers
from ._explain_network import timm_model_of
from ._features import PretrainedCNNFeatures
from ._finetune import FineTuneClassifier
from .utils import derive_seed, root_seed

__all__ = [
    "PROBE_LAYER",
    "RandomizationResult",
    "randomization_layers",
    "randomization_test",
    "randomized_copy",
    "saliency_correlation",
]

#: Name of the linear model of a probe pipeline in the randomisation order (its top layer).
PROBE_LAYER = "probe"


def saliency_correlation(a, b, *, absolute: bool = False) -> np.ndarray:
    """Spearman rank correlation of two sets of maps of the same images, per sample.

    Parameters
    ----------
    a, b : SaliencyMaps
        Maps of the same images (e.g. a trained and a randomised network).
    absolute : bool, default=False
        Correlate the magnitudes ``|map|`` (Adebayo et al. report both for signed maps).

    Returns
    -------
    ndarray of float of shape (n_samples,)
        0 where one of the two maps is constant (it keeps none of the other's ranking), NaN
        where both are.
    """
    from scipy.stats import spearmanr

    if len(a) != len(b):
        raise ValueError(f"the two sets hold {len(a)} and {len(b)} samples; explain the same X.")
    out = np.full(len(a), np.nan)
    for i, (va, vb) in enumerate(zip(a.views, b.views)):
        xa = np.concatenate([np.ravel(v.saliency) for v in va])
        xb = np.concatenate([np.ravel(v.saliency) for v in vb])
        if xa.shape != xb.shape:
            raise ValueError(f"sample {i}: the maps have different sizes; explain the same X.")
        if absolute:
            xa, xb = np.abs(xa), np.abs(xb)
        ok = np.isfinite(xa) & np.isfinite(xb)
        xa, xb = xa[ok], xb[ok]
        if xa.size < 2 or (np.ptp(xa) == 0 and np.ptp(xb) == 0):
            continue
        if np.ptp(xa) == 0 or np.ptp(xb) == 0:  # a constant map keeps none of the ranking
            out[i] = 0.0
            continue
        out[i] = float(spearmanr(xa, xb).statistic)
    return out


# --------------------------------------------------------------------------------------------
# randomised copies
# --------------------------------------------------------------------------------------------
def _reinit(model: torch.nn.Module, names: list[str], seed: int) -> int:
    """Re-initialise (PyTorch's default initialisation) the modules of the named layers."""
    by_name = {layer.name: layer for layer in get_transfer_layers(model)}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(
            f"layers {unknown!r} are not transfer layers of the network ({list(by_name)!r})."
        )
    count = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            for mname in by_name[name].module_names:
                module = model.get_submodule(mname)
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
                    count += 1
    return count


def _refit_bn(model: torch.nn.Module, names: list[str], batches) -> None:
    """Re-estimate the BatchNorm statistics of the named (re-initialised) layers on batches.

    Random weights no longer fit the layers' running statistics: through dozens of layers the
    activations vanish (to subnormal numbers, which also makes the CPU very slow) or explode.
    The statistics of the other layers are kept.
    """
    by_name = {layer.name: layer for layer in get_transfer_layers(model)}
    random_modules = {m for n in names for m in by_name[n].module_names}
    layers = bn_layers(model)
    if not any(name in random_modules for name, _ in layers):
        return
    keep = {
        name: (m.running_mean.detach().clone(), m.running_var.detach().clone())
        for name, m in layers
        if name not in random_modules
    }
    reestimate_bn_stats(model, batches)
    with torch.no_grad():
        for name, m in layers:
            if name in keep:
                m.running_mean.copy_(keep[name][0])
                m.running_var.copy_(keep[name][1])


def _cnn_step(pipe):
    for i, (_, step) in enumerate(pipe.steps):
        if isinstance(step, PretrainedCNNFeatures):
            return i
        if isinstance(step, AdaBN):
            break
    raise TypeError(
        "randomization_test needs a FineTuneClassifier or a linear-probe Pipeline on "
        "PretrainedCNNFeatures (AdaBN-wrapped estimators are not supported: randomise the "
        "unwrapped estimator)."
    )


def randomization_layers(estimator) -> list[str]:
    """The layers of a fitted estimator from the output downwards (the randomisation order).

    A :class:`~skrtl.FineTuneClassifier`: its transfer layers from the classifier down to the
    stem. A linear-probe Pipeline: ``"probe"`` (the linear model), then the backbone's
    transfer layers from the top down.
    """
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, FineTuneClassifier):
        model = timm_model_of(estimator.nets_[0].module_)
        return [layer.name for layer in reversed(get_transfer_layers(model))]
    if isinstance(estimator, Pipeline):
        cnn = estimator.steps[_cnn_step(estimator)][1]
        layers = [layer.name for layer in reversed(get_transfer_layers(cnn.model_))]
        return [PROBE_LAYER, *layers]
    raise TypeError(
        "randomization_test needs a fitted FineTuneClassifier or a linear-probe Pipeline on "
        f"PretrainedCNNFeatures; got {type(estimator).__name__}."
    )


def randomized_copy(estimator, layers, *, X=None, random_state=0):
    """A copy of a fitted estimator whose named layers are re-initialised.

    Parameters
    ----------
    estimator : FineTuneClassifier or Pipeline
        Fitted; never modified (the copy owns private copies of its networks).
    layers : list of str
        Transfer-layer names (:func:`randomization_layers`), and ``"probe"`` for the linear
        model of a probe pipeline (its coefficients are redrawn from a normal distribution
        with their own standard deviation).
    X : ndarray or image frame, optional
        Images on which the BatchNorm statistics of the re-initialised layers are re-estimated
        (recommended: the running statistics of trained layers do not fit random weights, and
        the activations vanish or explode through the network); without ``X`` they are reset
        to PyTorch's initial values (mean 0, variance 1).
    random_state : int, RandomState instance or None, default=0

    Returns
    -------
    estimator
        Predicts (and can be explained) like the original with those layers random.
    """
    from sklearn.pipeline import Pipeline

    seed = root_seed(random_state)
    layers = list(layers)
    if isinstance(estimator, FineTuneClassifier):
        new = estimator._skrtl_network_copy()
        for m, net in enumerate(new.nets_):
            model = timm_model_of(net.module_)
            _reinit(model, layers, derive_seed(seed, "randomize", m))
            if X is not None:
                _refit_bn(model, layers, new._skrtl_iter_inputs(X))
        return new
    if isinstance(estimator, Pipeline):
        k = _cnn_step(estimator)
        steps = list(estimator.steps)
        net_layers = [name for name in layers if name != PROBE_LAYER]
        if net_layers:
            name, cnn = steps[k]
            cnn = cnn._skrtl_network_copy()
            _reinit(cnn.model_, net_layers, derive_seed(seed, "randomize", 0))
            if X is not None:
                Xc = estimator[:k].transform(X) if k else X
                _refit_bn(cnn.model_, net_layers, cnn._skrtl_iter_inputs(Xc))
            cnn._skrtl_invalidate_cache()
            steps[k] = (name, cnn)
        if PROBE_LAYER in layers:
            name, final = steps[-1]
            final = copy.deepcopy(final)
            coef = np.asarray(final.coef_, dtype=np.float64)
            rng = np.random.default_rng(derive_seed(seed, "randomize", "probe"))
            final.coef_ = rng.normal(0.0, float(coef.std()) or 1.0, coef.shape)
            steps[-1] = (name, final)
        new = copy.copy(estimator)
        new.steps = steps
        return new
    raise TypeError(
        "randomized_copy needs a fitted FineTuneClassifier or a linear-probe Pipeline on "
        f"PretrainedCNNFeatures; got {type(estimator).__name__}."
    )


# --------------------------------------------------------------------------------------------
class RandomizationResult:
    """Result of :func:`randomization_test`.

    Attributes
    ----------
    layers : list of str
        The layers in randomisation order (output first).
    randomized : list of list of str
        The layers random at each step.
    correlations : ndarray of shape (n_steps, n_samples)
        Spearman rank correlation of each sample's map with its trained map, per step.
    abs_correlations : ndarray of shape (n_steps, n_samples)
        The same for the magnitudes ``|map|``.
    trained : SaliencyMaps
        The maps of the trained estimator.
    maps : list of SaliencyMaps
        The maps at each step.
    cascade : bool
    """

    def __init__(
        self, *, layers, randomized, correlations, abs_correlations, trained, maps, cascade
    ):
        self.layers = list(layers)
        self.randomized = [list(r) for r in randomized]
        self.correlations = np.asarray(correlations, dtype=float)
        self.abs_correlations = np.asarray(abs_correlations, dtype=float)
        self.trained = trained
        self.maps = list(maps)
        self.cascade = bool(cascade)

    def summary(self) -> pd.DataFrame:
        """Per step: the layer, the median and quartiles of the Spearman correlations."""
        rows = []
        steps = zip(self.layers, self.correlations, self.abs_correlations)
        for k, (layer, r, a) in enumerate(steps):
            ok, ok_abs = r[np.isfinite(r)], a[np.isfinite(a)]
            rows.append(
                {
                    "step": k + 1,
                    "layer": layer,
                    "randomized": ", ".join(self.randomized[k]),
                    "spearman_median": float(np.median(ok)) if ok.size else np.nan,
                    "spearman_q25": float(np.quantile(ok, 0.25)) if ok.size else np.nan,
                    "spearman_q75": float(np.quantile(ok, 0.75)) if ok.size else np.nan,
                    "abs_spearman_median": float(np.median(ok_abs)) if ok_abs.size else np.nan,
                    "n_samples": int(ok.size),
                }
            )
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        """Median Spearman correlation (and quartiles) per randomised layer.

        Returns
        -------
        matplotlib Axes
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        table = self.summary()
        if ax is None:
            _, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(table) + 2), 3.0))
        pos = np.arange(len(table))
        ax.plot(pos, table["spearman_median"], marker="o", label="Spearman (median)")
        ax.fill_between(pos, table["spearman_q25"], table["spearman_q75"], alpha=0.25)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(pos)
        ax.set_xticklabels(table["layer"], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel("rank correlation with trained map")
        kind = "cascading" if self.cascade else "independent"
        ax.set_title(f"model randomisation ({kind}, {self.trained.method})", fontsize=9)
        return ax


def randomization_test(
    estimator,
    X,
    *,
    cascade: bool = True,
    n_layers: int | None = None,
    random_state=0,
    **explain_params,
) -> RandomizationResult:
    """The model-randomisation test of Adebayo et al. (2018) for :func:`skrtl.explain`.

    The maps of ``estimator`` on ``X`` are compared with those of copies whose layers are
    re-initialised from the output downwards (PyTorch's default initialisation; the BatchNorm
    statistics of the re-initialised layers re-estimated on ``X``), for the same target
    classes.

    Parameters
    ----------
    estimator : FineTuneClassifier or Pipeline
        A fitted fine-tuned classifier or linear-probe pipeline (not modified).
    X : ndarray or image frame
        A handful of images.
    cascade : bool, default=True
        ``True``: step ``k`` randomises the top ``k`` layers (cascading randomisation);
        ``False``: step ``k`` randomises only the ``k``-th layer from the top (independent).
    n_layers : int, optional
        Number of steps (layers from the top); default all layers.
    random_state : int, RandomState instance or None, default=0
        Seeds the re-initialisation.
    **explain_params
        Passed to :func:`skrtl.explain` (``method``, ``layer``, ...).

    Returns
    -------
    RandomizationResult
    """
    from ._explain import explain

    order = randomization_layers(estimator)
    if n_layers is not None:
        if isinstance(n_layers, bool) or not isinstance(n_layers, Integral) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int or None, got {n_layers!r}.")
        order = order[: int(n_layers)]
    trained = explain(estimator, X, **explain_params)
    params = dict(explain_params)
    if params.get("target") is None:  # the same classes as the trained maps, at every step
        params["target"] = list(trained.targets)
    maps, corr, acorr, randomized = [], [], [], []
    for k, layer in enumerate(order):
        chosen = order[: k + 1] if cascade else [layer]
        rand = randomized_copy(estimator, chosen, X=X, random_state=random_state)
        m = explain(rand, X, **params)
        maps.append(m)
        corr.append(saliency_correlation(trained, m))
        acorr.append(saliency_correlation(trained, m, absolute=True))
        randomized.append(chosen)
    return RandomizationResult(
        layers=order,
        randomized=randomized,
        correlations=np.vstack(corr),
        abs_correlations=np.vstack(acorr),
        trained=trained,
        maps=maps,
        cascade=cascade,
    )
