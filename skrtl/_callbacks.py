"""skorch callbacks of skrtl: frozen BatchNorm layers, validation scores and Optuna pruning.

* :class:`FreezeBatchNorm` keeps the normalisation (and dropout) of frozen layers in eval mode
  during training, so their running statistics keep their pretrained values. skorch's
  ``Freezer`` only stops gradients: BatchNorm layers of "frozen" layers would still update
  their statistics and normalise with batch statistics.
* :func:`validation_scoring` scores the validation split every epoch with a ranking metric
  (ROC AUC for two classes, accuracy otherwise).
* :class:`WarmupCosine` is the learning-rate factor of ``lr_schedule="warmup_cosine"``: a
  linear warm-up over the first epoch's batches, then cosine annealing to zero.
* :class:`OptunaPruning` reports each epoch's validation metric of one cross-validation fold to
  an Optuna trial (see :class:`skrtl.TransferSearchCV` for the step scheme) and prunes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import optuna
import torch
from skorch.callbacks import Callback, EpochScoring

__all__ = [
    "MONITORS",
    "FoldReporter",
    "FreezeBatchNorm",
    "OptunaPruning",
    "WarmupCosine",
    "WeightEMA",
    "WeightSWA",
    "validation_scoring",
]

# history keys tried (in this order) for pruning reports, with the sign that makes them
# "greater is better" like scikit-learn scorers (the study always maximises)
MONITORS: tuple[tuple[str, float], ...] = (
    ("valid_auc", 1.0),
    ("valid_acc", 1.0),
    ("valid_cindex", 1.0),
    ("valid_loss", -1.0),
)


class _EvalPreHook:
    """Forward-pre hook putting its module in eval mode (picklable, unlike a lambda)."""

    def __call__(self, module, args):
        if module.training:
            module.train(False)


def _mode_dependent(module) -> bool:
    """Modules whose forward depends on train / eval mode: BatchNorm, dropout, drop-path."""
    if getattr(module, "running_mean", None) is not None:
        return True
    name = type(module).__name__.lower()
    return "dropout" in name or "droppath" in name or "drop_path" in name


class FreezeBatchNorm(Callback):
    """Keep the BatchNorm (and dropout) layers of frozen modules in eval mode while training.

    skorch switches the whole module to train mode before every training batch; this callback
    registers forward-pre hooks that switch the named modules (and their mode-dependent
    submodules) back to eval just before they run, from ``on_train_begin`` to
    ``on_train_end``. Their running statistics therefore keep their values and they normalise
    with them, as a frozen layer should.

    Parameters
    ----------
    module_names : iterable of str
        Names of frozen modules inside the skorch net's ``module_``
        (``net.module_.get_submodule(name)``).
    """

    def __init__(self, module_names: Iterable[str] = ()):
        self.module_names = module_names

    def initialize(self):
        self.handles_ = []
        return self

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        self._remove()
        hook = _EvalPreHook()
        seen = set()
        for name in self.module_names:
            root = net.module_.get_submodule(name)
            for sub in root.modules():
                if id(sub) not in seen and _mode_dependent(sub):
                    seen.add(id(sub))
                    self.handles_.append(sub.register_forward_pre_hook(hook))

    def on_train_end(self, net, X=None, y=None, **kwargs):
        self._remove()

    def _remove(self):
        for handle in getattr(self, "handles_", []):
            handle.remove()
        self.handles_ = []

    def __getstate__(self):
        state = self.__dict__.copy()
        state["handles_"] = []
        return state


class WarmupCosine:
    """Learning-rate factor of batch ``step``: linear warm-up, then cosine annealing.

    A picklable ``lr_lambda`` for :class:`torch.optim.lr_scheduler.LambdaLR`, stepped after
    every training batch.

    Parameters
    ----------
    warmup_steps : int
        Batches of the warm-up; the factor rises linearly to 1 over them.
    total_steps : int
        Batches of the whole schedule; after the warm-up the factor follows a half cosine from
        1 to 0 at ``total_steps`` (and stays at 0 after it).
    """

    def __init__(self, warmup_steps: int, total_steps: int):
        self.warmup_steps = max(1, int(warmup_steps))
        self.total_steps = max(self.warmup_steps + 1, int(total_steps))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + float(np.cos(np.pi * min(progress, 1.0))))


def _labels_and_weights(y):
    """Class labels and sample weights (``None``) of a validation target: ``(n,)`` labels,
    or ``(n, 2)`` rows (label, sample weight) of a sample-weighted fit."""
    y = np.asarray(y)
    if y.ndim == 2:
        return y[:, 0].astype(np.int64), y[:, 1].astype(np.float64)
    return y, None


def _valid_auc(net, X, y):
    """ROC AUC of the positive class on the validation set (nan with a single class)."""
    from sklearn.metrics import roc_auc_score

    y, w = _labels_and_weights(y)
    if np.unique(y).size < 2:
        return float("nan")
    proba = net.predict_proba(X)
    return float(roc_auc_score(y, proba[:, 1], sample_weight=w))


def _valid_acc(net, X, y):
    y, w = _labels_and_weights(y)
    proba = net.predict_proba(X)
    return float(np.average(np.argmax(proba, axis=1) == y, weights=w))


def validation_scoring(n_classes: int) -> tuple[str, EpochScoring]:
    """``(name, EpochScoring)`` of the validation ROC AUC (2 classes) or accuracy."""
    name, func = ("valid_auc", _valid_auc) if n_classes == 2 else ("valid_acc", _valid_acc)
    return f"skrtl_{name}", EpochScoring(func, lower_is_better=False, name=name)


class FoldReporter:
    """Per-fold state shared between the CV objective and the :class:`OptunaPruning` callback.

    Parameters
    ----------
    trial : optuna.Trial
    fold : int
        Index of the cross-validation fold.
    stride : int
        Steps per fold (``epochs_per_fold``): epoch ``e`` of fold ``f`` is step
        ``f * stride + e``.
    monitor : str or None
        History key to report (prefix ``-`` or a name ending in ``loss``: lower is better);
        ``None`` tries :data:`MONITORS` in order.
    """

    def __init__(self, trial, fold: int, stride: int, monitor: str | None):
        self.trial = trial
        self.fold = fold
        self.stride = stride
        self.monitor = monitor
        self.n_epochs = 0
        self.n_reports = 0
        self.reported: set[int] = set()
        self.pruned = False

    def _value(self, row: Mapping) -> tuple[str, float] | None:
        if self.monitor is not None:
            key = self.monitor.lstrip("-")
            sign = -1.0 if self.monitor.startswith("-") or key.endswith("loss") else 1.0
            if key in row and row[key] is not None:
                return self.monitor, sign * float(row[key])
            return None
        for key, sign in MONITORS:
            if key in row and row[key] is not None:
                return key, sign * float(row[key])
        return None

    def report(self, row: Mapping) -> None:
        """Report one completed history row; raises ``optuna.TrialPruned`` when pruned."""
        epoch = int(row.get("epoch", len(self.reported) + 1)) - 1  # skorch counts from 1
        if epoch in self.reported or epoch >= self.stride or self.pruned:
            return
        found = self._value(row)
        if found is None:
            return
        value = found[1]
        self.monitor = found[0] if self.monitor is None else self.monitor
        self.reported.add(epoch)
        self.n_reports += 1
        self.trial.report(value, self.fold * self.stride + epoch)
        if self.trial.should_prune():
            self.pruned = True
            raise optuna.TrialPruned(
                f"pruned at fold {self.fold}, epoch {epoch + 1} ({self.monitor}={value:.4g})"
            )


class OptunaPruning(Callback):
    """Reports completed epochs to an Optuna trial through a :class:`FoldReporter`; prunes.

    A history row is complete (all scoring callbacks have written to it) only at the next
    ``on_epoch_begin`` or at ``on_train_end``, whatever the order of the other callbacks, so
    the report happens there; no training happens in between.
    """

    def __init__(self, reporter: FoldReporter | None = None):
        self.reporter = reporter

    def __deepcopy__(self, memo):  # a per-fit hook: clones share the live reporter
        return self

    def on_epoch_begin(self, net, **kwargs):
        if len(net.history) >= 2:
            self.reporter.report(net.history[-2])

    def on_epoch_end(self, net, **kwargs):
        self.reporter.n_epochs += 1

    def on_train_end(self, net, **kwargs):
        if len(net.history) >= 1:
            self.reporter.report(net.history[-1])


class WeightEMA(Callback):
    """Validate, keep and return an exponential moving average of the trained weights.

    After every training batch the average of each trainable parameter is updated,
    ``ema = d * ema + (1 - d) * w`` with ``d = min(decay, (1 + t) / (10 + t))`` after ``t``
    updates (a short warm-up, so that the average does not stay near the pretrained start).
    BatchNorm statistics are copied from the live network. For the validation batches of an
    epoch the averaged weights are loaded, so the validation scores, early stopping and its
    best-weights copy see them; training resumes from the live weights at the next epoch. At
    the end of training the network holds the averaged weights (or, with early stopping's
    ``load_best``, the best epoch's averaged weights).

    Parameters
    ----------
    decay : float in (0, 1), default=0.98
    """

    def __init__(self, decay: float = 0.98):
        self.decay = decay

    def initialize(self):
        self.ema_ = None
        self.live_ = None
        self.updates_ = 0
        return self

    def _params(self, net):
        return [p for p in net.module_.parameters() if p.requires_grad]

    def on_train_begin(self, net, **kwargs):
        self.ema_ = [p.detach().clone() for p in self._params(net)]
        self.live_ = None
        self.updates_ = 0

    def on_epoch_begin(self, net, **kwargs):
        self._restore_live(net)

    def on_batch_end(self, net, batch=None, training=None, **kwargs):
        if not training or self.ema_ is None:
            return
        self.updates_ += 1
        d = min(float(self.decay), (1.0 + self.updates_) / (10.0 + self.updates_))
        with torch.no_grad():
            for e, p in zip(self.ema_, self._params(net)):
                e.mul_(d).add_(p.detach(), alpha=1.0 - d)

    def on_batch_begin(self, net, batch=None, training=None, **kwargs):
        if not training:
            self._load_average(net)

    def on_train_end(self, net, **kwargs):
        # without validation batches the live weights are still loaded: load the average
        # (with early stopping, its load_best has already restored the best averaged weights)
        if self.live_ is None and self.ema_ is not None and self.updates_:
            self._load_average(net)
        self.live_ = None
        self.ema_ = None

    def _load_average(self, net):
        if self.live_ is not None or self.ema_ is None:
            return
        params = self._params(net)
        self.live_ = [p.detach().clone() for p in params]
        with torch.no_grad():
            for e, p in zip(self.ema_, params):
                p.copy_(e)

    def _restore_live(self, net):
        if self.live_ is None:
            return
        with torch.no_grad():
            for w, p in zip(self.live_, self._params(net)):
                p.copy_(w)
        self.live_ = None


class WeightSWA(Callback):
    """Stochastic weight averaging: end with the mean of the late epochs' weights.

    The trainable parameters at the end of every epoch from epoch ``ceil(start *
    max_epochs)`` on (1-based; at least the last epoch) are averaged with equal weights, and
    the network ends training with that average. The BatchNorm layers that trained (those
    with trainable parameters) then get running statistics of the averaged network: their
    statistics are reset and re-estimated, as cumulative averages, by one pass over the
    training split of the last epoch in training mode (no gradient, no optimizer step).
    :func:`torch.optim.swa_utils.update_bn` is not used because it resets *every* BatchNorm
    of the model, which would overwrite the pretrained statistics of the frozen layers.
    Validation during training sees the live weights, so use it without early stopping (an
    early stop before ``start`` leaves the live weights of the last epoch).

    Parameters
    ----------
    start : float in (0, 1], default=0.5
        Fraction of ``max_epochs`` after which averaging begins.
    update_bn : bool, default=True
        Re-estimate the statistics of the trained BatchNorm layers for the average.
    """

    def __init__(self, start: float = 0.5, update_bn: bool = True):
        self.start = start
        self.update_bn = update_bn

    def initialize(self):
        self.sum_ = None
        self.n_averaged_ = 0
        self.train_data_ = None
        return self

    def _params(self, net):
        return [p for p in net.module_.parameters() if p.requires_grad]

    def on_train_begin(self, net, **kwargs):
        self.sum_ = None
        self.n_averaged_ = 0
        self.train_data_ = None

    def on_epoch_begin(self, net, dataset_train=None, **kwargs):
        self.train_data_ = dataset_train

    def on_epoch_end(self, net, **kwargs):
        first = max(1, int(np.ceil(float(self.start) * int(net.max_epochs))))
        if len(net.history) < min(first, int(net.max_epochs)):
            return
        params = self._params(net)
        with torch.no_grad():
            if self.sum_ is None:
                self.sum_ = [p.detach().to(torch.float64).clone() for p in params]
            else:
                for s, p in zip(self.sum_, params):
                    s.add_(p.detach().to(torch.float64))
        self.n_averaged_ += 1

    def on_train_end(self, net, **kwargs):
        if self.sum_ is not None and self.n_averaged_:
            with torch.no_grad():
                for s, p in zip(self.sum_, self._params(net)):
                    p.copy_((s / self.n_averaged_).to(p.dtype))
            if self.update_bn and self.train_data_ is not None:
                self._reestimate_bn(net)
        self.sum_ = None
        self.train_data_ = None

    def _reestimate_bn(self, net):
        module = net.module_
        bns = [
            m
            for m in module.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats
            and any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        if not bns:
            return
        saved = {m: m.momentum for m in bns}
        was_training = module.training
        module.eval()  # dropout and the frozen layers' normalisation stay in eval mode
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the pass
            m.train()
        try:
            with torch.no_grad():
                for Xi, _ in net.get_iterator(self.train_data_, training=False):
                    net.infer(Xi)
        finally:
            for m, mom in saved.items():
                m.momentum = mom
            module.train(was_training)
