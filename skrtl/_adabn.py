"""AdaBN: adapt a CNN's BatchNorm statistics to unlabelled target-site images.

A pretrained or fine-tuned network normalises every BatchNorm layer with running statistics of
its *training* images. Images from another scanner (blur, noise, intensity scale) produce
activations with other moments, and everything after the first BatchNorm layer drifts. AdaBN
(Li et al. 2016, "Revisiting Batch Normalization For Practical Domain Adaptation") re-estimates
the running mean and variance of every BatchNorm layer on unlabelled images of the target domain
and changes nothing else: no weight is touched, no label is needed.

:class:`AdaBN` wraps a skrtl image estimator that runs a torch network (the CNN feature
transformer or the fine-tuning classifier) through the torch network protocol of
:class:`skrtl._base.TorchNetworkMixin`. Every adapted site gets its own copy of the fitted
estimator with that site's statistics, so no statistics are ever swapped in a shared network:
concurrent calls for different sites (threads, web services) cannot see each other's state.
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Iterable
from numbers import Integral, Real

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, MetaEstimatorMixin, TransformerMixin, _fit_context, clone
from sklearn.utils import get_tags
from sklearn.utils._metadata_requests import (
    MetadataRouter,
    MethodMapping,
    _routing_enabled,
    process_routing,
)
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._base import (
    DEFAULT_SITE_COLUMN,
    HarmonizationWarning,
    resolve_unseen,
    site_labels,
    unseen_constraint,
)
from .utils import forward_hooks

__all__ = ["AdaBN", "bn_input_moments", "bn_layers", "reestimate_bn_stats"]

# fewer target images than this give noisy BatchNorm statistics (a warning says so)
_MIN_ADAPT_IMAGES = 8

_SOURCE = "__source__"
_TARGET = "__target__"


# --------------------------------------------------------------------------------------------
# low-level: BatchNorm layers and statistics
# --------------------------------------------------------------------------------------------
def _is_frozen_bn(module: nn.Module) -> bool:
    # torchvision / timm FrozenBatchNorm2d and timm FrozenBatchNormAct2d: statistics and affine
    # parameters held as buffers, always normalising with the running statistics
    return (
        type(module).__name__.startswith("FrozenBatchNorm")
        and isinstance(getattr(module, "running_mean", None), torch.Tensor)
        and isinstance(getattr(module, "running_var", None), torch.Tensor)
    )


def bn_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm layers (with running statistics) of ``module``, in forward-definition order.

    Includes every :class:`torch.nn.modules.batchnorm._BatchNorm` subclass tracking running
    statistics (``nn.BatchNorm1d/2d/3d``, timm ``BatchNormAct2d``) and the frozen variants
    (torchvision / timm ``FrozenBatchNorm2d``, timm ``FrozenBatchNormAct2d``).
    """
    out = []
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.track_running_stats and m.running_mean is not None:
                out.append((name, m))
        elif _is_frozen_bn(m):
            out.append((name, m))
    return out


def _bn_state(module: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (m.running_mean.detach().clone(), m.running_var.detach().clone())
        for name, m in bn_layers(module)
    }


def _load_bn_state(module: nn.Module, state: dict) -> None:
    layers = dict(bn_layers(module))
    if set(layers) != set(state):
        raise RuntimeError(
            "AdaBN: the network's BatchNorm layers changed since their statistics were stored "
            "(was the estimator refitted outside AdaBN?). Refit the AdaBN wrapper."
        )
    with torch.no_grad():
        for name, (mean, var) in state.items():
            layers[name].running_mean.copy_(mean)
            layers[name].running_var.copy_(var)


def _module_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _matched_stats(mean_t, var_t, ref, cur, eps):
    """Statistics giving inputs of moments (mean_t, var_t) the outputs of the reference.

    With the current statistics ``(m0, v0)`` the reference inputs (moments ``mean_r, var_r``)
    are normalised to mean ``(mean_r - m0) / s0`` and sd ``sd_r / s0`` (``s0 = sqrt(v0 +
    eps)``); the returned ``(m, v)`` normalise the target inputs to the same moments. Channels
    constant on either side only get their mean shifted.
    """
    mean_r, var_r = (t.to(mean_t) for t in ref)
    m0, v0 = (t.to(mean_t) for t in cur)
    s0 = torch.sqrt(v0 + eps)
    sd_r, sd_t = torch.sqrt(var_r), torch.sqrt(var_t)
    tiny = 1e-6 * s0
    ok = (sd_r > tiny) & (sd_t > tiny)
    scale = torch.where(ok, sd_t / sd_r.clamp_min(1e-30), torch.ones_like(sd_t))
    s_new = s0 * scale
    m_new = mean_t - s_new * (mean_r - m0) / s0
    # running_var may fall below 0 by at most eps: only running_var + eps is ever used
    return m_new, s_new * s_new - eps


def bn_input_moments(
    module: nn.Module, batches: Iterable, *, n_batches: int | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pooled mean and (biased) variance of every BatchNorm layer's input, eval mode.

    The network runs unchanged (current statistics); used as the reference of
    :func:`reestimate_bn_stats` ``match=``.
    """
    layers = bn_layers(module)
    acc: dict[str, list] = {}

    def make_hook(name):
        def hook(mod, args):
            xd = args[0].detach().double()
            dims = [0] + list(range(2, xd.ndim))
            count = xd.numel() // xd.shape[1]
            a = acc.setdefault(name, [0.0, 0.0, 0])
            a[0] = a[0] + xd.mean(dim=dims) * count
            a[1] = a[1] + (xd * xd).mean(dim=dims) * count
            a[2] += count

        return hook

    was_training = {m: m.training for m in module.modules()}
    device = _module_device(module)
    try:
        module.eval()
        with forward_hooks([(m, make_hook(name)) for name, m in layers], pre=True):
            with torch.no_grad():
                for b, batch in enumerate(batches):
                    if n_batches is not None and b >= n_batches:
                        break
                    x = batch[0] if isinstance(batch, tuple | list) else batch
                    module(x.to(device))
    finally:
        for m, flag in was_training.items():
            m.train(flag)
    if not acc:
        raise ValueError("AdaBN got no source batch: pass at least one source image.")
    out = {}
    for name, (s1, s2, n) in acc.items():
        mean = s1 / n
        out[name] = (mean, (s2 / n - mean * mean).clamp_min(0.0))
    return out


def reestimate_bn_stats(
    module: nn.Module,
    batches: Iterable,
    *,
    momentum: float | None = None,
    n_batches: int | None = None,
    match: dict | None = None,
) -> int:
    """Re-estimate the running statistics of every BatchNorm layer of ``module`` in place.

    Each batch is forwarded once without gradients, every module in eval mode (dropout off)
    except that each BatchNorm layer normalises with the statistics of the current batch, as in
    training mode (frozen BatchNorm layers included, without converting them). With
    ``momentum=None`` the running mean and variance become the exact pooled moments of all
    forwarded activations (unbiased variance, PyTorch's convention), independent of the batch
    size; with a float, PyTorch's exponential moving average from reset statistics. No
    parameter is changed.

    Parameters
    ----------
    module : torch.nn.Module
    batches : iterable of tensors or of ``(tensor, ...)`` tuples
        Network input batches.
    momentum : float in (0, 1] or None, default=None
    n_batches : int, optional
        Use at most this many batches.
    match : dict, optional
        ``{layer name: (mean, var)}``: pooled moments of each BatchNorm layer's *input* on
        reference (source) images under the current statistics, from :func:`bn_input_moments`.
        Instead of the target's own moments, each layer gets the statistics that give the
        target images the same output moments as the reference images have with the current
        statistics (source-anchored AdaBN: the reference images' outputs do not change).
        Layers are matched in forward order within the same pass; ``momentum`` is ignored.

    Returns
    -------
    int
        Number of samples (batch rows) forwarded.
    """
    layers = bn_layers(module)
    if not layers:
        raise ValueError(
            "the network has no BatchNorm layer with running statistics; AdaBN has nothing to "
            "adapt (LayerNorm / GroupNorm networks are not affected by batch statistics)."
        )
    was_training = {m: m.training for m in module.modules()}
    acc: dict[str, list] = {}
    current = _bn_state(module) if match is not None else {}

    def make_hook(name):
        def hook(mod, args):
            x = args[0]
            dims = [0] + list(range(2, x.ndim))
            xd = x.detach().double()
            mean = xd.mean(dim=dims)
            sq = (xd * xd).mean(dim=dims)
            count = x.numel() // x.shape[1]
            var_b = (sq - mean * mean).clamp_min(0.0)
            a = acc.setdefault(name, [0.0, 0.0, 0, None, None])
            a[0] = a[0] + mean * count
            a[1] = a[1] + sq * count
            a[2] += count
            if momentum is not None:
                unbiased = var_b * count / max(count - 1, 1)
                if a[3] is None:
                    a[3] = torch.zeros_like(mean)
                    a[4] = torch.ones_like(mean)
                a[3] = (1 - momentum) * a[3] + momentum * mean
                a[4] = (1 - momentum) * a[4] + momentum * unbiased
            if match is not None and name in match:
                mean, var_b = _matched_stats(mean, var_b, match[name], current[name], mod.eps)
            # make the layer normalise with this batch's statistics (training-mode behaviour)
            mod.running_mean.copy_(mean.to(mod.running_mean.dtype))
            mod.running_var.copy_(var_b.to(mod.running_var.dtype))

        return hook

    n_seen = 0
    device = _module_device(module)
    try:
        module.eval()
        with forward_hooks([(m, make_hook(name)) for name, m in layers], pre=True):
            with torch.no_grad():
                for b, batch in enumerate(batches):
                    if n_batches is not None and b >= n_batches:
                        break
                    x = batch[0] if isinstance(batch, tuple | list) else batch
                    module(x.to(device))
                    n_seen += int(x.shape[0])
    finally:
        for m, flag in was_training.items():
            m.train(flag)
    if n_seen == 0:
        raise ValueError("AdaBN got no target batch: pass at least one target image.")
    with torch.no_grad():
        for name, m in layers:
            s1, s2, n, ema_mean, ema_var = acc[name]
            if match is not None and name in match:
                mean = s1 / n
                var_b = (s2 / n - mean * mean).clamp_min(0.0)
                mean, var = _matched_stats(mean, var_b, match[name], current[name], m.eps)
            elif momentum is None:
                mean = s1 / n
                var = (s2 / n - mean * mean).clamp_min(0.0) * n / max(n - 1, 1)
            else:
                mean, var = ema_mean, ema_var
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
            if isinstance(getattr(m, "num_batches_tracked", None), torch.Tensor):
                m.num_batches_tracked.zero_()
    return n_seen


# --------------------------------------------------------------------------------------------
# meta-estimator
# --------------------------------------------------------------------------------------------
def _inner_has(attr):
    def check(self):
        est = getattr(self, "estimator_", None)
        if est is None:
            est = self.estimator if self.estimator is not None else _default_estimator()
        return hasattr(est, attr)

    return check


def _default_estimator():
    from ._features import PretrainedCNNFeatures

    return PretrainedCNNFeatures()


def _rows(X, rows):
    if isinstance(X, pd.DataFrame):
        return X.iloc[rows]
    return np.asarray(X)[rows]


class AdaBN(MetaEstimatorMixin, TransformerMixin, BaseEstimator):
    """Adaptive BatchNorm: per-site BatchNorm statistics for a CNN image estimator.

    ``fit`` fits (a clone of) ``estimator`` on labelled source images; ``adapt`` re-estimates
    the running mean and variance of every BatchNorm layer on *unlabelled* target images (per
    target site when the target image frame has a site column) and keeps one copy of the
    fitted estimator per site with that site's statistics. ``transform`` / ``predict`` /
    ``predict_proba`` / ``decision_function`` run each sample through the copy of its site. No
    weight is ever changed.

    Parameters
    ----------
    estimator : estimator, default=None
        A skrtl torch image estimator (:class:`~skrtl.PretrainedCNNFeatures` by default, or
        :class:`~skrtl.FineTuneClassifier`; any estimator implementing the protocol of
        :class:`skrtl._base.TorchNetworkMixin`). To adapt an *already fitted* estimator, wrap it
        in :class:`sklearn.frozen.FrozenEstimator` (it is deep-copied, never modified).
    site_column : str or None, default="site"
        Column of the image frame holding each sample's site (the routed ``sample_domain``
        takes precedence). Statistics are estimated and applied per site. ``None``: the site
        column is ignored and all target images form one domain; after ``adapt`` every
        transformed sample uses the target statistics (unless ``sample_domain`` is routed).
    source_stats : {"match", "recompute", "keep"}, default="match"
        ``"recompute"``: after fitting, re-estimate the statistics on the source training
        images too, so that source and target are both normalised by their own moments (the
        AdaBN setting of Li et al.). ``"keep"``: keep the network's own statistics for the
        source domain, each target domain normalised by its own moments (right for a network
        whose statistics already are the source's: a fine-tuned classifier). ``"match"``
        (source-anchored): keep the network's statistics for the source domain and give each
        target domain the statistics under which its BatchNorm outputs have the moments the
        source images have with the network's statistics: source features are unchanged
        (the probe's source accuracy too), target features are moved onto them. Suited to a
        frozen ImageNet feature extractor on grey-level images, where ``"recompute"``
        amplifies near-constant channels (e.g. colour-opponent stem filters).
    unseen : {"error", "reference", "batch"}, default="error"
        A sample whose site was neither adapted nor seen in ``fit``: raise; use the source
        statistics (``"reference"``); or estimate that site's statistics from its images in
        the batch being transformed (``"batch"``, test-time adaptation, with a
        :class:`~skrtl.HarmonizationWarning`; nothing is stored).
    momentum : float in (0, 1] or None, default=None
        ``None``: exact pooled moments of the target activations; a float: exponential moving
        average (PyTorch's convention) from reset statistics.
    n_batches : int or None, default=None
        Use at most this many target batches per domain.
    batch_size : int or None, default=None
        Batch size of the statistics passes (None: the estimator's own). With ``momentum=None``
        the result does not depend on it, except through the batch statistics used to
        normalise earlier layers during the pass (larger is closer to population statistics).

    Attributes
    ----------
    estimator_ : estimator
        The fitted inner estimator, holding the source statistics.
    bn_stats_ : dict
        Domain -> {BatchNorm layer name: (running_mean, running_var)}; the source statistics
        are stored under ``"__source__"``.
    domains_ : list
        Adapted target domains.
    source_sites_ : list
        Sites seen in ``fit`` (empty without a site column).
    n_adapt_samples_ : dict
        Domain -> number of network input rows used.

    Notes
    -----
    Target images are given either to :meth:`adapt` after ``fit``, or as the fit parameter
    ``X_target`` (``fit(X, y, X_target=X_unlabelled)``; in a Pipeline ``step__X_target=...``,
    in :func:`~sklearn.model_selection.cross_validate` ``params={"adabn__X_target": ...}``): the
    unlabelled target images are not split by the CV, which is correct because they carry no
    label. Target rows of a *source* site are refused: a site seen in ``fit`` keeps the source
    statistics. Frozen BatchNorm layers (``FrozenBatchNorm2d``, ``FrozenBatchNormAct2d``) are
    re-estimated too: during the pass they are made to normalise with batch statistics.

    ``fit_transform`` (what a Pipeline calls during ``fit``) transforms the source rows with the
    source statistics. Domains can also be routed, skada-style, instead of a site column:
    inside ``sklearn.config_context(enable_metadata_routing=True)`` request them with
    ``set_fit_request(X_target=True, target_domain=True, sample_domain=True)`` and
    ``set_transform_request(sample_domain=True)``; other fit parameters (e.g.
    ``sample_weight``) are routed to the inner estimator as it requests them.

    Thread safety: after ``fit`` / ``adapt``, ``transform`` and the prediction methods may be
    called from several threads at once; each site's copy serialises its own forward passes.
    ``fit`` and ``adapt`` must not run concurrently with other calls.

    Examples
    --------
    ``make_pipeline(AdaBN(PretrainedCNNFeatures()), LogisticRegression())`` fitted with
    ``pipe.fit(X_site_a, y_site_a, adabn__X_target=X_site_b)``: ``pipe.predict_proba(X)``
    then uses each row's site statistics (see ``docs/harmonization.md``).
    """

    _parameter_constraints: dict = {
        "estimator": [HasMethods(["fit"]), None],
        "site_column": [str, None],
        "source_stats": [StrOptions({"recompute", "keep", "match"})],
        "unseen": unseen_constraint(),
        "momentum": [Interval(Real, 0, 1, closed="right"), None],
        "n_batches": [Interval(Integral, 1, None, closed="left"), None],
        "batch_size": [Interval(Integral, 1, None, closed="left"), None],
    }

    def __init__(
        self,
        estimator=None,
        *,
        site_column=DEFAULT_SITE_COLUMN,
        source_stats="match",
        unseen="error",
        momentum=None,
        n_batches=None,
        batch_size=None,
    ):
        self.estimator = estimator
        self.site_column = site_column
        self.source_stats = source_stats
        self.unseen = unseen
        self.momentum = momentum
        self.n_batches = n_batches
        self.batch_size = batch_size

    # ----------------------------------------------------------------------------------------
    def _base_estimator(self):
        return self.estimator if self.estimator is not None else _default_estimator()

    @staticmethod
    def _check_protocol(est):
        for hook in ("_skrtl_torch_module", "_skrtl_iter_inputs"):
            if not callable(getattr(est, hook, None)):
                raise TypeError(
                    f"AdaBN needs an estimator that runs a torch network and implements {hook}() "
                    f"(skrtl's PretrainedCNNFeatures or FineTuneClassifier); got "
                    f"{type(est).__name__}."
                )

    @staticmethod
    def _module_of(est) -> nn.Module:
        module = est._skrtl_torch_module()
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"{type(est).__name__}._skrtl_torch_module() returned "
                f"{type(module).__name__}, not a torch.nn.Module."
            )
        return module

    @staticmethod
    def _invalidate(est) -> None:
        inv = getattr(est, "_skrtl_invalidate_cache", None)
        if callable(inv):
            inv()

    @staticmethod
    def _copy_of(est):
        """A copy of the fitted estimator that owns its network (its state may change)."""
        make = getattr(est, "_skrtl_network_copy", None)
        return make() if callable(make) else copy.deepcopy(est)

    def _batches(self, est, X):
        kwargs = {} if self.batch_size is None else {"batch_size": self.batch_size}
        return est._skrtl_iter_inputs(X, **kwargs)

    def _labels(self, X, sample_domain):
        return site_labels(
            X, site_column=self.site_column, sample_domain=sample_domain, name="AdaBN"
        )

    def _adapted_copy(self, X, label: str):
        """A copy of ``estimator_`` with BatchNorm statistics estimated on ``X``."""
        est = self._copy_of(self.estimator_)
        module = self._module_of(est)
        _load_bn_state(module, self.bn_stats_[_SOURCE])
        n = reestimate_bn_stats(
            module,
            self._batches(est, X),
            momentum=self.momentum,
            n_batches=self.n_batches,
            match=self._source_moments,
        )
        self._invalidate(est)
        if n < _MIN_ADAPT_IMAGES:
            warnings.warn(
                f"AdaBN: the statistics of site {label!r} come from {n} network image(s); "
                f"with fewer than {_MIN_ADAPT_IMAGES} the BatchNorm moments are noisy and the "
                "adapted features may be worse than unadapted ones. Adapt on more unlabelled "
                "images of that site.",
                HarmonizationWarning,
                stacklevel=4,
            )
        return est, _bn_state(module), n

    # ----------------------------------------------------------------------------------------
    @_fit_context(prefer_skip_nested_validation=False)
    def fit(
        self, X, y=None, *, X_target=None, sample_domain=None, target_domain=None, **fit_params
    ):
        """Fit the inner estimator on source images, then adapt to ``X_target`` if given.

        Parameters
        ----------
        X : ndarray or image frame
            Labelled source images.
        y : array-like, optional
        X_target : ndarray or image frame, optional
            Unlabelled target images (see :meth:`adapt`).
        sample_domain : array-like of shape (n_samples,), optional
            Site of each source row, instead of the frame's site column (metadata routing,
            skada's name). Source sites are routed to the source statistics at transform time.
        target_domain : array-like of shape (n_target,), optional
            Site of each row of ``X_target`` (passed to :meth:`adapt` as its
            ``sample_domain``).
        **fit_params
            Passed to the inner estimator's ``fit`` (with metadata routing enabled: routed
            as the inner estimator requests them).

        Returns
        -------
        self
        """
        resolve_unseen(self.unseen, "AdaBN")  # a deprecated option name warns once per fit
        base = self._base_estimator()
        est = clone(base)
        if est is base:  # FrozenEstimator (already fitted): never modify the user's object
            est = copy.deepcopy(base)
        self._check_protocol(est)
        if _routing_enabled():
            fit_params = process_routing(self, "fit", **fit_params).estimator.fit
        if y is None:
            est.fit(X, **fit_params)
        else:
            est.fit(X, y, **fit_params)
        self.estimator_ = est
        sites = self._labels(X, sample_domain)
        self.source_sites_ = sorted(set(sites)) if sites is not None else []
        self.domains_ = []
        self.n_adapt_samples_ = {}
        self.bn_stats_ = {}
        self._variants = {}
        self._lock = threading.Lock()
        module = self._module_of(est)
        self._source_moments = None
        if self.source_stats == "recompute":
            n = reestimate_bn_stats(
                module, self._batches(est, X), momentum=self.momentum, n_batches=self.n_batches
            )
            self.n_adapt_samples_[_SOURCE] = n
        elif self.source_stats == "match":
            self._source_moments = bn_input_moments(
                module, self._batches(est, X), n_batches=self.n_batches
            )
        self.bn_stats_[_SOURCE] = _bn_state(module)
        self._invalidate(est)
        if hasattr(est, "n_features_in_"):
            self.n_features_in_ = est.n_features_in_
        if hasattr(est, "feature_names_in_"):
            self.feature_names_in_ = est.feature_names_in_
        if X_target is not None:
            self.adapt(X_target, sample_domain=target_domain)
        elif target_domain is not None:
            raise ValueError(
                "target_domain was given without X_target; pass the unlabelled target images as "
                "X_target=... together with their sites."
            )
        return self

    def adapt(self, X_target, *, sample_domain=None):
        """Re-estimate BatchNorm statistics on unlabelled target images, per site.

        Parameters
        ----------
        X_target : ndarray or image frame
            Unlabelled target images. With a site column (``site_column``) one set of
            statistics is estimated per site; otherwise all images form one target domain.
        sample_domain : array-like of shape (n_target,), optional
            Site of each target image, overriding the site column (skada's name; used
            whatever ``site_column`` is).

        Returns
        -------
        self
        """
        check_is_fitted(self, "bn_stats_")
        n = len(X_target) if hasattr(X_target, "__len__") else np.asarray(X_target).shape[0]
        if n == 0:
            raise ValueError("AdaBN got no target image: X_target is empty.")
        labels = self._labels(X_target, sample_domain)
        if labels is None:
            labels = np.full(n, _TARGET, dtype=object)  # a single target domain
        clash = sorted(set(labels) & set(self.source_sites_))
        if clash:
            raise ValueError(
                f"AdaBN.adapt got target images of the source sites {clash!r} (seen in fit). "
                "A source site keeps the source statistics, so adapting it would change what "
                "fit_transform returned for the training rows. Pass only images of new sites "
                "(or label them as a different site)."
            )
        for dom in sorted(set(labels)):
            Xd = _rows(X_target, np.flatnonzero(labels == dom))
            variant, state, n_rows = self._adapted_copy(Xd, dom)
            with self._lock:
                self.bn_stats_[dom] = state
                self._variants[dom] = variant
                self.n_adapt_samples_[dom] = n_rows
                if dom not in self.domains_:
                    self.domains_.append(dom)
        return self

    # ----------------------------------------------------------------------------------------
    def _variant(self, key):
        """The estimator holding the statistics of domain ``key`` (built once, then reused)."""
        if key == _SOURCE:
            return self.estimator_
        with self._lock:
            est = self._variants.get(key)
            if est is None:  # e.g. after unpickling: rebuild from the stored statistics
                est = self._copy_of(self.estimator_)
                _load_bn_state(self._module_of(est), self.bn_stats_[key])
                self._invalidate(est)
                self._variants[key] = est
        return est

    def _route(self, X, sample_domain=None) -> tuple[np.ndarray, np.ndarray | None]:
        """Domain key of every row of ``X`` (keys of ``bn_stats_``, or a batch site)."""
        n = len(X) if hasattr(X, "__len__") else np.asarray(X).shape[0]
        labels = self._labels(X, sample_domain)
        if labels is None:
            adapted = list(self.domains_)
            if not adapted:
                return np.full(n, _SOURCE, dtype=object), None
            if adapted == [_TARGET]:
                return np.full(n, _TARGET, dtype=object), None
            raise ValueError(
                f"AdaBN was adapted to sites {adapted!r} but X has no site column "
                f"(site_column={self.site_column!r}) to pick the statistics of each sample. "
                "Pass an image frame with sites (skrtl.make_image_frame(images, sites=...)), "
                "route sample_domain=..., or use site_column=None."
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # already said in fit
            unseen = resolve_unseen(self.unseen, "AdaBN")
        keys = np.empty(n, dtype=object)
        unknown = set()
        for i, s in enumerate(labels):
            if s in self.bn_stats_:
                keys[i] = s
            elif s in self.source_sites_ or unseen == "reference":
                keys[i] = _SOURCE
            else:
                keys[i] = s
                unknown.add(s)
        if unknown and unseen == "error":
            raise ValueError(
                f"sites {sorted(unknown)!r} were neither adapted (adapted: {self.domains_!r}) nor "
                f"seen in fit (source sites: {self.source_sites_!r}). Call adapt() with "
                "unlabelled images of those sites, set unseen='reference' to use the source "
                "statistics for them, or unseen='batch' to estimate them from the batch."
            )
        return keys, labels

    def site_estimators(self, X, *, sample_domain=None) -> list[tuple[str, object, np.ndarray]]:
        """The fitted copy of the inner estimator that serves each row of ``X``.

        ``transform`` and the prediction methods run every row through the copy holding its
        site's BatchNorm statistics; this returns those copies, e.g. to explain each row with
        the network that predicts it (:func:`skrtl.explain`).

        Parameters
        ----------
        X : ndarray or image frame
        sample_domain : array-like of shape (n_samples,), optional
            Site of each row (metadata routing), instead of the frame's site column.

        Returns
        -------
        list of (str, estimator, ndarray of int)
            ``(domain, estimator, rows)`` per group of rows: the domain key (a site,
            ``"__source__"`` for the source statistics, ``"__target__"`` for a single target
            domain), the fitted estimator copy and the row positions it serves. With
            ``unseen="batch"``, a site that was not adapted gets a copy adapted on its rows of
            ``X`` (with a :class:`~skrtl.HarmonizationWarning`); it is not stored.
        """
        check_is_fitted(self, "bn_stats_")
        keys, _ = self._route(X, sample_domain)
        groups = sorted(set(keys), key=lambda k: (k != _SOURCE, str(k)))
        out = []
        for g in groups:
            rows = np.flatnonzero(keys == g)
            if g in self.bn_stats_:
                est = self._variant(g)
            else:  # unseen="batch": statistics of this site's rows in the batch, not stored
                warnings.warn(
                    f"AdaBN: site {g!r} was not adapted; its BatchNorm statistics are estimated "
                    f"from its {rows.size} images in this batch (unseen='batch').",
                    HarmonizationWarning,
                    stacklevel=3,
                )
                Xg = X if len(groups) == 1 else _rows(X, rows)
                est, _, _ = self._adapted_copy(Xg, g)
            out.append((g, est, rows))
        return out

    def _per_domain(self, method: str, X, sample_domain=None, *, source=False):
        check_is_fitted(self, "bn_stats_")
        if source:
            return getattr(self.estimator_, method)(X)
        groups = self.site_estimators(X, sample_domain=sample_domain)
        outs, rows_all = [], []
        for _, est, rows in groups:
            Xg = X if len(groups) == 1 else _rows(X, rows)
            outs.append(getattr(est, method)(Xg))
            rows_all.append(rows)
        if len(groups) == 1:
            return outs[0]
        if isinstance(outs[0], pd.DataFrame):
            order = np.concatenate(rows_all)
            return pd.concat(outs).iloc[np.argsort(order, kind="stable")]
        arrs = [np.asarray(o) for o in outs]
        n_rows = sum(len(rows) for rows in rows_all)
        out = np.empty((n_rows,) + arrs[0].shape[1:], dtype=arrs[0].dtype)
        for rows, a in zip(rows_all, arrs):
            out[rows] = a
        return out

    @available_if(_inner_has("transform"))
    def transform(self, X, *, sample_domain=None):
        """Inner ``transform`` with the BatchNorm statistics of each sample's site.

        Parameters
        ----------
        X : ndarray or image frame
        sample_domain : array-like of shape (n_samples,), optional
            Site of each row (metadata routing), instead of the frame's site column.
        """
        return self._per_domain("transform", X, sample_domain)

    @available_if(_inner_has("transform"))
    def fit_transform(self, X, y=None, **fit_params):
        """Fit, then transform the *source* rows ``X`` with the source statistics.

        In a Pipeline the next step is thus trained on source features normalised by source
        statistics, whatever target domains were adapted (``X_target``).

        Parameters
        ----------
        X : ndarray or image frame
        y : array-like, optional
        **fit_params
            Passed to :meth:`fit`.

        Returns
        -------
        ndarray or DataFrame
        """
        return self.fit(X, y, **fit_params)._per_domain("transform", X, source=True)

    @available_if(_inner_has("predict"))
    def predict(self, X, *, sample_domain=None):
        """Inner ``predict`` with the BatchNorm statistics of each sample's site.

        Parameters
        ----------
        X : ndarray or image frame
        sample_domain : array-like of shape (n_samples,), optional
            Site of each row (metadata routing), instead of the frame's site column.
        """
        return self._per_domain("predict", X, sample_domain)

    @available_if(_inner_has("predict_proba"))
    def predict_proba(self, X, *, sample_domain=None):
        """Inner ``predict_proba`` with the BatchNorm statistics of each sample's site.

        Parameters
        ----------
        X : ndarray or image frame
        sample_domain : array-like of shape (n_samples,), optional
            Site of each row (metadata routing), instead of the frame's site column.
        """
        return self._per_domain("predict_proba", X, sample_domain)

    @available_if(_inner_has("decision_function"))
    def decision_function(self, X, *, sample_domain=None):
        """Inner ``decision_function`` with the BatchNorm statistics of each sample's site.

        Parameters
        ----------
        X : ndarray or image frame
        sample_domain : array-like of shape (n_samples,), optional
            Site of each row (metadata routing), instead of the frame's site column.
        """
        return self._per_domain("decision_function", X, sample_domain)

    @available_if(_inner_has("score"))
    def score(self, X, y, sample_weight=None, *, sample_domain=None):
        """Accuracy (classifier), Harrell's C (survival) or R^2 with the adapted statistics."""
        pred = self.predict(X, sample_domain=sample_domain)
        if hasattr(self.estimator_, "survival_train_"):  # a risk score (FineTuneSurvival)
            from ._survival import concordance_index

            return concordance_index(y, pred, sample_weight=sample_weight)
        if hasattr(self.estimator_, "classes_"):
            from sklearn.metrics import accuracy_score

            return accuracy_score(y, pred, sample_weight=sample_weight)
        from sklearn.metrics import r2_score

        return r2_score(y, pred, sample_weight=sample_weight)

    @property
    def classes_(self):
        """Class labels of the inner classifier."""
        check_is_fitted(self, "estimator_")
        return self.estimator_.classes_

    @available_if(_inner_has("get_feature_names_out"))
    def get_feature_names_out(self, input_features=None):
        """Feature names of the inner transformer."""
        check_is_fitted(self, "estimator_")
        return self.estimator_.get_feature_names_out(input_features)

    def _skrtl_torch_module(self) -> nn.Module:
        """The inner network (it holds the source statistics)."""
        check_is_fitted(self, "estimator_")
        return self._module_of(self.estimator_)

    def get_metadata_routing(self):
        """Metadata routing of this meta-estimator: its own parameters, then the inner fit's.

        Returns
        -------
        sklearn.utils.metadata_routing.MetadataRouter
        """
        return (
            MetadataRouter(owner=type(self).__name__)
            .add_self_request(self)
            .add(
                estimator=self._base_estimator(),
                method_mapping=MethodMapping().add(caller="fit", callee="fit"),
            )
        )

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_variants"] = {}  # rebuilt from bn_stats_ on first use
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "bn_stats_" in state:
            self._lock = threading.Lock()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        base = self.estimator
        if base is not None:
            inner = get_tags(base)
            tags.estimator_type = inner.estimator_type
            tags.input_tags = copy.deepcopy(inner.input_tags)
            tags.target_tags = copy.deepcopy(inner.target_tags)
            tags.classifier_tags = copy.deepcopy(inner.classifier_tags)
            tags.regressor_tags = copy.deepcopy(inner.regressor_tags)
            tags.transformer_tags = copy.deepcopy(inner.transformer_tags)
        else:
            tags.input_tags.two_d_array = False
            tags.input_tags.three_d_array = True
        return tags
