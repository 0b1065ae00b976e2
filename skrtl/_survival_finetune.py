"""Fine-tuning a pretrained CNN against a Cox partial likelihood: survival from images.

:class:`FineTuneSurvival` is the survival counterpart of :class:`~skrtl.FineTuneClassifier` and
shares all of its machinery (:class:`~skrtl._finetune.BaseFineTune`): strategies, freeze depth,
layer-wise learning rates, frozen-prefix caching, the cross-fitted ensemble, test-time
augmentation, augmentation, the torch network protocol (so :class:`~skrtl.AdaBN` works) and
Optuna pruning in :class:`~skrtl.TransferSearchCV`. What differs is the target and the loss:

* the new head has **one output**, the risk score (log partial hazard, the linear predictor of
  a Cox model on learnt features): higher = shorter survival;
* the loss is the **negative Cox log partial likelihood** of a batch, divided by its number of
  events, with Efron's (default) or Breslow's handling of tied event times
  (:func:`cox_partial_likelihood_loss`, :class:`CoxPartialLikelihoodLoss`);
* training batches are **event-stratified** (:class:`EventStratifiedLoader`): every batch
  holds its share of the events, so each partial likelihood has events and risk sets;
* validation folds are stratified on the event indicator and early stopping watches the
  validation **C-index** (Harrell's, ``valid_cindex``);
* ``predict_survival_function`` uses a Breslow baseline hazard estimated on the training risks.

Why event-stratified batches rather than risk sets accumulated across batches
------------------------------------------------------------------------------------
The partial likelihood couples every sample to every sample still at risk, so a mini-batch can
only compute it within the batch (the batch's own risk sets). That is the partial likelihood
of a random subsample: its gradient is that of a well-defined objective whose maximiser
approaches the full-data one as the batch grows (the mini-batch Cox objective of Kvamme et al.
2019 and Tarkhan & Simon 2020). Its failure mode is a batch with no or very few events, where
the gradient is zero or very noisy; stratifying the batches on the event indicator removes it
without changing what is estimated. Accumulating risk sets across batches (a memory of risks
from earlier batches) would reuse risks computed by earlier weights -- stale after every step
of a fine-tuned backbone and its BatchNorm statistics -- and carry no gradient through them.
Larger batches give a closer approximation; ``batch_size`` defaults to 64 here, and a warning
says when the expected number of events per batch falls below 2.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils._param_validation import StrOptions
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ._backbone import DEFAULT_BACKBONE
from ._base import ImageEstimatorMixin
from ._finetune import BaseFineTune
from ._survival import (
    ProportionalHazardsMixin,
    as_survival_target,
    breslow_cumulative_hazard,
    concordance_index,
    make_survival_target,
)
from .utils import root_seed

__all__ = [
    "CoxPartialLikelihoodLoss",
    "EventStratifiedLoader",
    "EventStratifiedSampler",
    "FineTuneSurvival",
    "cox_partial_likelihood_loss",
]

_TIES = ("efron", "breslow")


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------
def cox_partial_likelihood_loss(
    risk: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    *,
    ties: str = "efron",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative Cox log partial likelihood of risk scores, divided by the number of events.

    For the distinct event times ``t_j`` with ``d_j`` events (set ``D_j``) and risk set
    ``R_j = {i : time_i >= t_j}``, the log partial likelihood is

    * Breslow: ``sum_j [sum_{i in D_j} r_i - d_j log sum_{i in R_j} e^{r_i}]``;
    * Efron: ``sum_j [sum_{i in D_j} r_i - sum_{l=0}^{d_j-1} log(sum_{i in R_j} e^{r_i} -
      l / d_j sum_{i in D_j} e^{r_i})]``.

    Both equal the exact partial likelihood without tied event times. The sums are computed
    with log-sum-exp, so large risk scores do not overflow. The value equals lifelines' and
    scikit-survival's partial likelihoods (``tests/test_survival_finetune.py``).

    With sample weights ``w`` (lifelines' ``weights_col``), every sum over samples is
    weighted: ``r_i`` of an event counts ``w_i`` times, risk sets sum ``w_i e^{r_i}``, ``d_j``
    in Breslow's term becomes the weight ``W_j`` of the events at ``t_j`` and Efron's
    ``d_j`` log terms are scaled by ``W_j / d_j``; the result is divided by the total event
    weight. Samples of weight 0 are left out. For Breslow's handling an integer weight is
    equivalent to repeating the sample; for Efron's it is not quite, since repeated events
    would be tied.

    Parameters
    ----------
    risk : torch.Tensor of shape (n,) or (n, 1)
        Risk scores (log partial hazards): higher = shorter survival.
    time : torch.Tensor of shape (n,)
        Event or censoring times (only their order and ties matter).
    event : torch.Tensor of shape (n,)
        Event indicator (bool or 0/1).
    ties : {"efron", "breslow"}, default="efron"
    weight : torch.Tensor of shape (n,), optional
        Non-negative sample weights.

    Returns
    -------
    torch.Tensor
        A scalar: ``-log L / n_events`` (``/ total event weight`` with ``weight``); 0 (still
        attached to ``risk``'s graph) when there is no event.
    """
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES!r}, got {ties!r}.")
    risk = risk.reshape(-1)
    time = time.reshape(-1).to(risk.device)
    event = event.reshape(-1).to(risk.device)
    if event.dtype != torch.bool:
        event = event > 0.5
    if not (risk.shape == time.shape == event.shape):
        raise ValueError(
            f"risk, time and event must have one value per sample, got shapes "
            f"{tuple(risk.shape)}, {tuple(time.shape)} and {tuple(event.shape)}."
        )
    if weight is not None:
        return _weighted_cox_loss(risk, time, event, weight.reshape(-1).to(risk), ties)
    n_events = int(event.sum())
    if n_events == 0:
        return risk.sum() * 0.0
    event_times, d = torch.unique(time[event], return_counts=True)  # (m,)
    minus_inf = torch.tensor(float("-inf"), dtype=risk.dtype, device=risk.device)
    at_risk = time[None, :] >= event_times[:, None]  # (m, n)
    log_risk_set = torch.logsumexp(torch.where(at_risk, risk[None, :], minus_inf), dim=1)
    d = d.to(risk.dtype)
    log_denominator = d * log_risk_set
    if ties == "efron":
        tied = (time[None, :] == event_times[:, None]) & event[None, :]
        log_tied = torch.logsumexp(torch.where(tied, risk[None, :], minus_inf), dim=1)
        share = torch.exp(log_tied - log_risk_set)  # in (0, 1]
        steps = torch.arange(int(d.max()), dtype=risk.dtype, device=risk.device)
        frac = steps[None, :] / d[:, None]  # l / d_j, (m, max d)
        used = steps[None, :] < d[:, None]
        # log(1 - l/d * share) >= log(1/d) > -inf: l <= d - 1 and share <= 1
        corr = torch.log1p(-torch.where(used, frac, torch.zeros_like(frac)) * share[:, None])
        log_denominator = log_denominator + corr.sum(dim=1)
    return (log_denominator.sum() - risk[event].sum()) / n_events


def _weighted_cox_loss(risk, time, event, weight, ties):
    """:func:`cox_partial_likelihood_loss` with sample weights (validated inputs)."""
    if weight.shape != risk.shape:
        raise ValueError(
            f"weight must have one value per sample, got shape {tuple(weight.shape)} for "
            f"{risk.numel()} samples."
        )
    zero = risk.sum() * 0.0
    keep = weight > 0
    if not bool(keep.all()):
        risk, time, event, weight = risk[keep], time[keep], event[keep], weight[keep]
    total = weight[event].sum()
    if not bool(event.any()) or float(total) <= 0:
        return zero
    log_w = torch.log(weight)
    event_times, d = torch.unique(time[event], return_counts=True)  # (m,)
    minus_inf = torch.tensor(float("-inf"), dtype=risk.dtype, device=risk.device)
    at_risk = time[None, :] >= event_times[:, None]  # (m, n)
    wr = risk + log_w  # log(w e^r)
    log_risk_set = torch.logsumexp(torch.where(at_risk, wr[None, :], minus_inf), dim=1)
    tied = (time[None, :] == event_times[:, None]) & event[None, :]
    w_tied = torch.where(tied, weight[None, :], torch.zeros_like(weight)[None, :]).sum(1)
    log_denominator = w_tied * log_risk_set
    if ties == "efron":
        d = d.to(risk.dtype)
        log_tied = torch.logsumexp(torch.where(tied, wr[None, :], minus_inf), dim=1)
        share = torch.exp(log_tied - log_risk_set)  # in (0, 1]
        steps = torch.arange(int(d.max()), dtype=risk.dtype, device=risk.device)
        frac = steps[None, :] / d[:, None]
        used = steps[None, :] < d[:, None]
        corr = torch.log1p(-torch.where(used, frac, torch.zeros_like(frac)) * share[:, None])
        log_denominator = log_denominator + (w_tied / d) * corr.sum(dim=1)
    return (log_denominator.sum() - (weight * risk)[event].sum()) / total


class CoxPartialLikelihoodLoss(nn.Module):
    """Cox partial-likelihood loss for skorch / torch training (see
    :func:`cox_partial_likelihood_loss`).

    ``loss(risk, target)`` takes the network output ``risk`` of shape ``(n, 1)`` or ``(n,)``
    and ``target`` of shape ``(n, 2)``: the time in column 0 and the event indicator (1 =
    event, 0 = censored) in column 1; an optional column 2 holds sample weights.

    Parameters
    ----------
    ties : {"efron", "breslow"}, default="efron"
    """

    def __init__(self, ties: str = "efron"):
        super().__init__()
        if ties not in _TIES:
            raise ValueError(f"ties must be one of {_TIES!r}, got {ties!r}.")
        self.ties = ties

    def forward(self, risk: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = target[:, 2] if target.shape[1] > 2 else None
        return cox_partial_likelihood_loss(
            risk, target[:, 0], target[:, 1], ties=self.ties, weight=weight
        )


# --------------------------------------------------------------------------------------------
# batches with events
# --------------------------------------------------------------------------------------------
class EventStratifiedSampler(Sampler):
    """Random order of the samples in which the events are spread evenly.

    Events and censored samples are shuffled separately and interleaved at even spacing (with
    a random phase), so that every run of ``b`` consecutive samples -- a batch -- holds
    ``b * n_events / n`` events, rounded up or down. Draws from the global torch generator
    (which the fine-tuning estimator forks and seeds for every member).

    Parameters
    ----------
    event : array-like of bool of shape (n,)
    """

    def __init__(self, event):
        self.event = np.asarray(event, dtype=bool)

    def __len__(self) -> int:
        return int(self.event.size)

    def __iter__(self):
        groups = [np.flatnonzero(self.event), np.flatnonzero(~self.event)]
        order, keys = [], []
        for rows in groups:
            if rows.size == 0:
                continue
            perm = rows[torch.randperm(rows.size).numpy()]
            phase = float(torch.rand(()))
            order.append(perm)
            keys.append((np.arange(rows.size) + phase) / rows.size)
        order, keys = np.concatenate(order), np.concatenate(keys)
        return iter(order[np.argsort(keys, kind="stable")].tolist())


def _events_of(dataset) -> np.ndarray:
    """Event indicator (column 1 of the target) of every row of a skorch dataset."""
    if isinstance(dataset, torch.utils.data.Subset):
        return _events_of(dataset.dataset)[np.asarray(dataset.indices)]
    y = getattr(dataset, "y", None)
    if y is None:  # pragma: no cover - skrtl always passes a skorch Dataset with targets
        raise TypeError("EventStratifiedLoader needs a dataset with targets y (time, event).")
    return np.asarray(torch.as_tensor(y)[:, 1]) > 0.5


class EventStratifiedLoader(DataLoader):
    """skorch ``iterator_train``: a DataLoader whose batches hold their share of the events.

    It takes skorch's loader arguments; ``shuffle`` and ``sampler`` are replaced by an
    :class:`EventStratifiedSampler` on the event column of the dataset's targets (time,
    event).
    """

    def __init__(self, dataset, batch_size=1, shuffle=None, sampler=None, **kwargs):
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=EventStratifiedSampler(_events_of(dataset)),
            **kwargs,
        )


# --------------------------------------------------------------------------------------------
# validation score
# --------------------------------------------------------------------------------------------
def _valid_cindex(net, X, y):
    """Harrell's C of the network's risk on the validation set (nan without a comparable pair);
    rows (time, event[, sample weight])."""
    y = np.asarray(y, dtype=float)
    y = y.reshape(-1, y.shape[-1] if y.ndim == 2 else 2)
    w = y[:, 2] if y.shape[1] > 2 else None
    risk = np.asarray(net.predict(X), dtype=float).reshape(-1)
    try:
        target = make_survival_target(y[:, 1] > 0.5, y[:, 0])
        return float(concordance_index(target, risk, sample_weight=w))
    except ValueError:
        return float("nan")


def _risk_output(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, :1]


# --------------------------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------------------------
class FineTuneSurvival(ImageEstimatorMixin, ProportionalHazardsMixin, BaseFineTune):
    """Fine-tune a pretrained CNN on images against a Cox partial likelihood.

    The network ends in one output, a risk score (log partial hazard): ``predict`` returns
    it (**higher = shorter survival**, like :class:`~skrtl.CoxPHSurvival`), ``score`` is
    Harrell's C-index and ``predict_survival_function`` combines it with a Breslow baseline
    hazard estimated on the training risks. Targets are structured survival arrays (event,
    time), read by :func:`skrtl.as_survival_target` like every skrtl survival estimator.

    The transfer machinery is that of :class:`~skrtl.FineTuneClassifier`; the parameters
    below that it shares mean the same there.

    Parameters
    ----------
    backbone : str, default="tf_efficientnet_lite0"
        timm architecture; the default has embedded ImageNet weights (works offline).
    weights : str or Path, optional
        Local weights file for ``backbone`` (see :func:`skrtl.load_backbone`).
    pretrained : bool, default=True
        Start from pretrained weights (``strategy="scratch"`` implies ``False``).
    strategy : {"finetune", "linear_probe", "scratch"}, default="finetune"
        ``"finetune"``: layers ``1..freeze_depth`` frozen, the rest trained with layer-wise
        learning rates; ``"linear_probe"``: only the new risk head trains (a Cox model on the
        frozen deep features, fitted by stochastic gradient); ``"scratch"``: random start.
    freeze_depth : int or "auto", default="auto"
        Number ``k`` of frozen transfer layers (:func:`skrtl.get_transfer_layers`, the head is
        layer ``L``). ``"auto"`` asks :func:`~skrtl._advisor.suggest_strategy` with the
        training size (events and censored samples as its two groups); for a 3-D network at
        least half of the layers, as for the classifier.
    gamma : float in (0, 1], default=0.7
        Layer-wise learning-rate decay: layer ``l`` trains with ``lr * gamma ** (L - l)``.
    lr : float, default=1e-3
        Learning rate of the head.
    weight_decay : float, default=1e-4
    optimizer : {"adamw", "adam", "sgd"} or torch.optim.Optimizer subclass, default="adamw"
    optimizer_params : dict or None, default=None
        The optimizer of the layer-wise parameter groups and its further arguments, as for
        the classifier (``"sgd"`` has ``momentum=0.9``).
    max_epochs : int, default=15
    batch_size : int, default=64
        Samples per training batch, and so per partial likelihood: the Cox loss compares a
        sample only with the samples of its batch. Larger batches approximate the full
        partial likelihood better; a warning says when fewer than 2 events per batch are
        expected.
    precision : {"fp32", "bf16"}, default="fp32"
        Arithmetic of the network's forward passes in training and prediction. ``"bf16"``
        runs them under bfloat16 autocast (``torch.autocast``; weights, gradients and the
        optimizer stay float32), meant for GPUs and CPUs with bfloat16 kernels (AVX512-BF16 /
        AMX); the frozen-prefix cache is computed in float32 either way. On the 2-core CPU of
        the benchmarks it barely sped up full fine-tuning and not the default (prefix-cached)
        one: ``docs/benchmarks.md`` gives the measured speed and accuracy; fp32 is the default.
    num_workers : int, default=0
        Worker processes of the training DataLoader; results do not depend on it.
    input_size : int, (int, int), (int, int, int) or "auto", default="auto"
        ``"auto"``: 96 for images, 64 (a 64^3 cube) for the volumes of a 3-D network.
    mode : {"2d", "2.5d", "3d"}, default="2d"
        Input kind, as for the classifier; with slice-wise ``"3d"`` every slice is a training
        image with its volume's target, and predicted risks are averaged over the slices of a
        volume.
    volumetric : {"slices", "acs", "inflate"}, default="slices"
        How ``mode="3d"`` runs the network, as for the classifier: slice by slice, or a 3-D
        network converted from the pretrained 2-D one (:func:`skrtl.convert_to_3d`).
    slices : {"orthogonal", "adjacent"}, default="orthogonal"
    n_slices : int, default=3
    intensity : {"auto", "window", "percentile", "minmax", "uint8", "none"}, default="auto"
    windows : list of (level, width), optional
    percentiles : (float, float), default=(0.5, 99.5)
        Preprocessing parameters, the same as :class:`~skrtl.PretrainedCNNFeatures`.
    augment : bool or callable, default=False
        ``True``: the built-in light augmentation of training images (never at predict
        time); a callable: a per-sample transform (torchvision v2, MONAI) with the contract
        of the classifier's ``augment``.
    ties : {"efron", "breslow"}, default="efron"
        Handling of tied event times in the partial likelihood.
    early_stopping : {"auto", "score", "loss"} or bool, default="auto"
        Stop when the validation C-index (``"auto"``, ``True`` or ``"score"``) or the
        validation Cox loss (``"loss"``) has not improved for ``patience`` epochs and restore
        the weights of the best epoch. ``False``: no early stopping. Needs
        ``validation_fraction``.
    patience : int or "auto", default="auto"
        Epochs without improvement before stopping. ``"auto"``: 5, or 2 for a 3-D network.
    validation_fraction : float in (0, 0.5] or None, default=0.2
        Size of the internal validation split, stratified on the event indicator (``None``:
        no split, no early stopping).
    lr_schedule : {"auto", "cosine", "warmup_cosine", "constant"}, default="auto"
        As for the classifier: cosine annealing over ``max_epochs``, with a linear warm-up
        over the first epoch's batches (``"warmup_cosine"``), or none. ``"auto"``: the
        warm-up for a 3-D network, else ``"cosine"``.
    drop_rate : float or None, default=None
        Dropout before the head (``None``: the timm default of the backbone).
    callbacks : list or None, default=None
        Extra skorch callbacks; they run after the built-in scoring, so ``net.history``
        already holds ``valid_loss`` and ``valid_cindex`` of the epoch (Optuna pruning in
        :class:`~skrtl.TransferSearchCV` reports ``valid_cindex``).
    batch_size_predict : int or None, default=None
        Batch size for prediction (``None``: ``2 * batch_size``).
    n_estimators : int, default=5
        Networks in the cross-fitted ensemble (each with its own validation fold, stratified
        on the event indicator); their risk scores are averaged. Use 1 for quick experiments.
    tta : bool, default=True
        Average the risk of each image and of its horizontal mirror image (a volume of a 3-D
        network: its mirror images along the three axes).
    device : str, default="auto"
    random_state : int, RandomState instance or None, default=None
        Seeds the validation folds, the batches, dropout and augmentation (forked torch RNG).
    verbose : int, default=0

    Attributes
    ----------
    net_ : skorch.NeuralNet
        The first member's trained net.
    nets_ : list of skorch.NeuralNet
        The ``n_estimators`` members.
    survival_train_ : structured array of shape (n_samples,)
        The training target; the IPCW scorers (Uno's C, time-dependent AUC, Brier score)
        take the censoring distribution from it.
    risk_offset_ : float
        Mean raw ensemble risk on the training images; ``predict`` subtracts it, so the
        training risks are centred on 0 (as a Cox model centres on the training mean).
    unique_times_ : ndarray
        Distinct training times, the grid of the baseline hazard.
    baseline_cumulative_hazard_ : ndarray
        Breslow baseline cumulative hazard at ``unique_times_`` for the training risks.
    baseline_survival_ : ndarray
        ``exp(-baseline_cumulative_hazard_)``.
    event_times_ : ndarray
        Distinct training event times (default grid of :meth:`predict_survival_function`).
    concordance_index_ : float
        Harrell's C of the training risks (optimistic: the networks saw these images).
    n_layers_, layer_names_, freeze_depth_, layer_lrs_ : as for the classifier
    history_, histories_, best_epoch_, best_epochs_ : as for the classifier
        History rows hold ``valid_loss`` (the validation partial likelihood per event) and
        ``valid_cindex`` with a validation split.
    cached_prefix_ : int
    input_config_ : dict
    preprocessor_ : ImagePreprocessor
    device_ : str

    See Also
    --------
    skrtl.FineTuneClassifier : the same machinery for class labels.
    skrtl.CoxPHSurvival : a Cox model on frozen features (:class:`~skrtl.PretrainedCNNFeatures`).

    Examples
    --------
    >>> import numpy as np
    >>> from skrtl import FineTuneSurvival, make_survival_target
    >>> rng = np.random.default_rng(0)
    >>> X = rng.random((16, 32, 32))
    >>> y = make_survival_target(rng.random(16) < 0.7, rng.exponential(10, 16))
    >>> model = FineTuneSurvival(input_size=32, max_epochs=1, n_estimators=1, random_state=0)
    >>> model = model.fit(X, y)
    >>> model.predict(X).shape, model.predict_survival_function(X, times=[5.0]).shape
    ((16,), (16, 1))
    """

    _strata_name = "event status (censored, event)"
    _default_stopping = "score"

    _AUTO_INPUT_SIZE = 96

    _parameter_constraints: dict = {
        **BaseFineTune._parameter_constraints,
        "ties": [StrOptions(set(_TIES))],
    }

    def __init__(
        self,
        *,
        backbone=DEFAULT_BACKBONE,
        weights=None,
        pretrained=True,
        strategy="finetune",
        freeze_depth="auto",
        gamma=0.7,
        lr=1e-3,
        weight_decay=1e-4,
        optimizer="adamw",
        optimizer_params=None,
        max_epochs=15,
        batch_size=64,
        num_workers=0,
        input_size="auto",
        mode="2d",
        volumetric="slices",
        slices="orthogonal",
        n_slices=3,
        intensity="auto",
        windows=None,
        percentiles=(0.5, 99.5),
        augment=False,
        precision="fp32",
        ties="efron",
        early_stopping="auto",
        patience="auto",
        validation_fraction=0.2,
        lr_schedule="auto",
        drop_rate=None,
        callbacks=None,
        batch_size_predict=None,
        n_estimators=5,
        tta=True,
        device="auto",
        random_state=None,
        verbose=0,
    ):
        self.backbone = backbone
        self.weights = weights
        self.pretrained = pretrained
        self.strategy = strategy
        self.freeze_depth = freeze_depth
        self.gamma = gamma
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer = optimizer
        self.optimizer_params = optimizer_params
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.input_size = input_size
        self.mode = mode
        self.volumetric = volumetric
        self.slices = slices
        self.n_slices = n_slices
        self.intensity = intensity
        self.windows = windows
        self.percentiles = percentiles
        self.augment = augment
        self.precision = precision
        self.ties = ties
        self.early_stopping = early_stopping
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.lr_schedule = lr_schedule
        self.drop_rate = drop_rate
        self.callbacks = callbacks
        self.batch_size_predict = batch_size_predict
        self.n_estimators = n_estimators
        self.tta = tta
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ----------------------------------------------------------------------------------------
    def _check_target(self, y, n: int) -> np.ndarray:
        name = type(self).__name__
        if y is None:
            raise ValueError(
                f"{name} requires y to be passed, but the target y is None. Pass a survival "
                "target: y = skrtl.make_survival_target(event, time)."
            )
        try:
            y = as_survival_target(y)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        if y.shape[0] != n:
            raise ValueError(f"X has {n} samples but y has {y.shape[0]}.")
        n_events = int(y["event"].sum())
        if n_events == 0:
            raise ValueError(
                f"y has no event (all {n} samples censored): the Cox partial likelihood of "
                f"{name} needs at least one event."
            )
        expected = min(int(self.batch_size), n) * n_events / n
        if expected < 2:
            warnings.warn(
                f"{name}: {n_events} events in {n} samples give about {expected:.1f} events "
                f"per training batch of batch_size={self.batch_size!r}; a partial likelihood "
                "with so few events is a very noisy gradient. Increase batch_size (it can be "
                "the whole training set on small cohorts).",
                UserWarning,
                stacklevel=3,
            )
        return y

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Fine-tune the network on images ``X`` with survival target ``y``.

        Parameters
        ----------
        X : ndarray or image frame
            ``(n, H, W)`` / ``(n, H, W, C)`` images (``mode="2d"``), ``(n, D, H, W)`` volumes,
            or an image frame from :func:`skrtl.make_image_frame`.
        y : structured array or DataFrame of shape (n,)
            Survival target (event, time), e.g. from :func:`skrtl.make_survival_target`.
        sample_weight : array-like of shape (n,), optional
            Non-negative sample weights of the weighted Cox partial likelihood (lifelines'
            ``weights_col``, see :func:`cox_partial_likelihood_loss`), used for the training
            and validation losses, the validation C-index, the Breslow baseline hazard and
            ``risk_offset_``. Samples of weight 0 are left out, exactly as if they were not in
            ``X`` (``survival_train_`` holds the others). Routed by metadata routing:
            ``set_fit_request(sample_weight=True)``.

        Returns
        -------
        self
        """
        size, windows = self._check_image_params()
        data = self._read(X)
        n = len(data)
        target = self._check_target(y, n)
        sw = self._check_fit_sample_weight(sample_weight, n)
        if sw is not None and not np.any((sw > 0) & target["event"].astype(bool)):
            raise ValueError(
                "sample_weight is 0 for every sample with an event: the weighted Cox partial "
                "likelihood needs at least one event of positive weight."
            )
        data, keep = self._drop_zero_weights(X, data, sw)
        if keep is not None:
            target, sw = target[keep], sw[keep]
            n = len(data)
        event, time = target["event"].astype(bool), target["time"].astype(float)
        rows = np.column_stack([time, event.astype(float)])
        plan = self._fit_networks(
            data,
            torch.as_tensor(rows, dtype=torch.float64),
            event.astype(int),
            n_out=1,
            weight=None,
            seed=root_seed(self.random_state),
            size=size,
            windows=windows,
            sample_weight=sw,
        )
        raw = self._fit_outputs(plan, data, _risk_output).mean(0)[:, 0]
        w = sw
        self.risk_offset_ = float(np.average(raw, weights=w))
        risk = raw - self.risk_offset_
        self.survival_train_ = make_survival_target(event, time)
        self.unique_times_, self.baseline_cumulative_hazard_ = breslow_cumulative_hazard(
            self.survival_train_, risk, sample_weight=w
        )
        self.baseline_survival_ = np.exp(-self.baseline_cumulative_hazard_)
        self.event_times_ = np.unique(time[event])
        self.concordance_index_ = concordance_index(self.survival_train_, risk, sample_weight=w)
        return self

    # hooks of BaseFineTune
    def _net_options(self, plan):
        from skorch import NeuralNet

        kwargs = {"criterion__ties": self.ties, "iterator_train": EventStratifiedLoader}
        return NeuralNet, CoxPartialLikelihoodLoss, kwargs

    def _validation_scoring(self, plan):
        from skorch.callbacks import EpochScoring

        scoring = EpochScoring(_valid_cindex, lower_is_better=False, name="valid_cindex")
        return "skrtl_valid_cindex", scoring

    def _validation_keys(self, plan):
        return ["valid_cindex"]

    # ----------------------------------------------------------------------------------------
    # prediction
    # ----------------------------------------------------------------------------------------
    def predict(self, X) -> np.ndarray:
        """Risk score (log partial hazard): higher = higher hazard = shorter survival.

        The mean over the ensemble members, the views (``tta``) and the slices of a volume
        (``mode="3d"``) of the network output, minus ``risk_offset_``.

        Parameters
        ----------
        X : ndarray or image frame

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        return self._member_outputs(X, _risk_output).mean(0)[:, 0] - self.risk_offset_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.random_state is None
        tags.target_tags.required = True
        return tags
