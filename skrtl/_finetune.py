"""Fine-tuning a pretrained CNN as a scikit-learn classifier, built on skorch.

:class:`FineTuneClassifier` creates skorch :class:`~skorch.NeuralNetClassifier` nets in ``fit``
(attribute ``nets_``, composition, no subclassing) around a timm backbone with a new
classification head, and adds what transfer learning on small medical data sets needs:

* ``strategy``: ``"scratch"`` (random init, everything trains), ``"linear_probe"`` (only the
  head trains) or ``"finetune"``;
* ``freeze_depth=k``: transfer layers ``1..k`` (see :func:`skrtl.get_transfer_layers`) get
  ``requires_grad=False`` **and** their BatchNorm layers stay in eval mode during training
  (:class:`~skrtl._callbacks.FreezeBatchNorm`), so their running statistics keep their
  pretrained values;
* discriminative learning rates ``lr * gamma ** (L - l)`` for layer ``l > k``, one real
  optimizer parameter group per layer (:mod:`skrtl._transfer`);
* **frozen-prefix caching**: without augmentation, the outputs of the frozen layers are
  computed once per image and only the remaining layers run during training;
* class weights, internal stratified validation split with early stopping and best-weights
  restore, cosine learning-rate schedule, light augmentation (train only);
* options: a per-sample training transform (``augment``: torchvision v2, MONAI or any
  callable, seeded per sample from ``random_state``), the optimizer of the layer-wise groups
  (``optimizer``, ``optimizer_params``), DataLoader workers (``num_workers``) and weighted
  losses (``fit(..., sample_weight=...)``, routed by metadata routing);
* a cross-fitted ensemble (``n_estimators`` networks, each with its own validation fold) and
  mirror-image test-time augmentation;
* volumes as volumes: ``mode="3d"`` with ``volumetric="acs"`` / ``"inflate"`` fine-tunes a
  3-D network converted from the pretrained 2-D one (:func:`skrtl.convert_to_3d`), with the
  same transfer layers, freeze depth, learning rates, prefix cache, ensemble and TTA;
* a fresh pretrained start in every ``fit`` (safe in ``GridSearchCV``), ``random_state``
  reproducibility, pickling.

Images become network input through the one preprocessing path of every torch estimator
(:class:`~skrtl._preprocess.ImagePreprocessor`). Fitting one ensemble member is the
module-level function :func:`fit_member`.

:class:`BaseFineTune` holds all of this machinery apart from the target: the classifier adds
class labels, a cross-entropy loss and probabilities; :class:`~skrtl.FineTuneSurvival` adds
survival targets, a Cox partial-likelihood loss and risk scores.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import warnings
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import ClassifierMixin, _fit_context
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.utils import _safe_indexing
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._augment import LightAugment, SampleAugmentLoader, apply_sample_transform
from ._backbone import DEFAULT_BACKBONE, backbone_data_config, get_transfer_layers
from ._base import BaseTorchImageEstimator, ImageEstimatorMixin
from ._callbacks import FreezeBatchNorm, WarmupCosine, validation_scoring
from ._transfer import (
    EnsembleModule,
    LayerwiseOptimizer,
    TransferModule,
    create_transfer_model,
    prefix_stages,
)
from .utils import (
    check_class_labels,
    choose_threshold,
    derive_seed,
    resolve_device,
    root_seed,
)

__all__ = ["BaseFineTune", "FineTuneClassifier", "fit_member"]

_STRATEGIES = ("scratch", "linear_probe", "finetune")

# optimizer names -> (class, default arguments); lr and weight_decay come from the estimator
_OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, {}),
    "adam": (torch.optim.Adam, {}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
}

# at most this many bytes of cached frozen-prefix activations (else caching is skipped)
_MAX_CACHE_BYTES = 2 * 1024**3

# test-time views of a volume (N, C, D, H, W) for a 3-D network: the axes each view flips
# (the volume and its mirror images along width, height and depth)
_VOLUME_TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-3,))

# defaults of a 3-D network (volumetric="acs" / "inflate"), chosen on AdrenalMNIST3D's training
# volumes (out-of-fold AUC of the ensemble members, docs/benchmarks.md "True 3-D transfer"):
# freeze_depth="auto" freezes at least this fraction of the transfer layers (5 of lite0's 10),
# patience="auto" is _VOLUME_PATIENCE (the members' best validation epoch was 1-4),
# early_stopping="auto" watches the validation score (AUC) instead of the loss (a higher
# out-of-fold AUC over 3 seeds), lr_schedule="auto" warms the learning rate up over the first
# epoch (out-of-fold AUC 0.766 vs 0.757 over 3 seeds, rule fixed before the runs) and
# FineTuneClassifier's input_size="auto" is a 48^3 cube
_VOLUME_MIN_FREEZE = 0.5
_VOLUME_PATIENCE = 2
_PATIENCE = 5


def _silent(*args, **kwargs):
    return None


@dataclass
class _FitPlan:
    """What every ensemble member of one ``fit`` shares."""

    pretrained: bool
    in_chans: int
    n_out: int  # output units of the new head (classes; 1 for a risk score)
    X_img: torch.Tensor | None  # network inputs of every image (None: only X_prefix kept)
    owner: np.ndarray  # sample of each network image
    y_rows: torch.Tensor  # target of each network image (class index, or time and event)
    weight: torch.Tensor | None  # class weights
    frozen_params: set
    frozen_modules: list
    layer_of: dict
    lr_of_layer: dict
    layer_names: dict
    n_prefix: int  # stages whose output is cached
    X_prefix: torch.Tensor | None  # cached prefix output (pretrained prefix: shared)
    use_valid: bool
    devices: list  # CUDA devices whose RNG a member forks
    sample_weighted: bool = False  # y_rows ends in a column of sample weights
    splits: list | None = None  # (train_idx, valid_idx) of every member (None: no validation)


def _run_prefix(module: TransferModule, X_img, n_prefix: int, device, batch_size: int):
    """Output of the first ``n_prefix`` stages for every network image (no grad, eval)."""
    module.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(X_img), batch_size):
            xb = X_img[start : start + batch_size].to(device)
            out.append(module.forward_stages(xb, 0, n_prefix).cpu())
    return torch.cat(out)


def fit_member(estimator, plan: _FitPlan, *, seed: int, train_idx, valid_idx):
    """Fine-tune one ensemble member of ``estimator`` (a :class:`BaseFineTune` subclass).

    The member starts from the pretrained weights with a new head, trains on the network
    images of the samples ``train_idx`` and stops early on those of ``valid_idx``. Every
    random draw (head initialisation of a scratch network, shuffling, dropout, augmentation)
    comes from the torch generator forked and seeded with ``seed``, so members are
    independent and reproducible and the caller's generator is untouched.

    Returns
    -------
    net : skorch.NeuralNet
        The estimator's net class (``NeuralNetClassifier`` for the classifier).
    history : list of dict
    best_epoch : int or None
        Epoch restored by early stopping.
    """
    from skorch.callbacks import EarlyStopping
    from skorch.dataset import Dataset

    device = estimator.device_
    with torch.random.fork_rng(devices=plan.devices):
        torch.manual_seed(seed)
        model = create_transfer_model(
            estimator.backbone,
            pretrained=plan.pretrained,
            weights=estimator.weights,
            in_chans=plan.in_chans,
            n_out=plan.n_out,
            drop_rate=estimator.drop_rate,
            volumetric=estimator._network_kind(),
        )
        for pname, p in model.named_parameters():
            p.requires_grad_(pname not in plan.frozen_params)
        module = TransferModule(model).to(device)
        module.autocast_dtype = torch.bfloat16 if estimator.precision == "bf16" else None
        if plan.n_prefix and plan.X_prefix is not None:
            X_net = plan.X_prefix
        elif plan.n_prefix:  # random weights: every member has its own prefix
            X_net = _run_prefix(module, plan.X_img, plan.n_prefix, device, estimator._bs_pred())
        else:
            X_net = plan.X_img
        rows_tr = np.flatnonzero(np.isin(plan.owner, train_idx))
        rows_va = np.flatnonzero(np.isin(plan.owner, valid_idx))
        ds_valid = Dataset(X_net[rows_va], plan.y_rows[rows_va]) if plan.use_valid else None
        net = estimator._make_net(module, ds_valid, plan, n_rows_train=len(rows_tr))
        module.start = plan.n_prefix
        try:
            net.fit(Dataset(X_net[rows_tr], plan.y_rows[rows_tr]), None)
        finally:
            module.start = 0
    best = None
    for _, cb in net.callbacks_:
        if isinstance(cb, EarlyStopping):
            best = int(cb.best_epoch_) if plan.use_valid else None
            cb.best_model_weights_ = None  # release the copy of the best weights
    if not (plan.use_valid and estimator.early_stopping):
        best = None
    module.eval()
    return net, estimator._history(net, plan), best


def _net_with_module_copy(net):
    """Shallow copy of a fitted skorch net with a private deep copy of its module only."""
    new = object.__new__(type(net))
    new.__dict__.update(net.__dict__)
    new.__dict__["module_"] = copy.deepcopy(net.module_)
    return new


class BaseFineTune(BaseTorchImageEstimator):
    """Fine-tuning machinery shared by :class:`FineTuneClassifier` and
    :class:`~skrtl.FineTuneSurvival`; not an estimator by itself.

    It builds the transfer structure (freeze depth, layer-wise learning rates, frozen-prefix
    cache), the cross-fitted validation folds, one skorch net per ensemble member
    (:func:`fit_member`), the histories, the torch network protocol
    (:class:`~skrtl._base.TorchNetworkMixin`) and the test-time-augmented forward passes. A
    subclass declares its parameters (those of :attr:`_parameter_constraints` and its own),
    reads its target in ``fit`` and calls :meth:`_fit_networks`, and defines the hooks

    ``_net_options(plan) -> (net_class, criterion, net_kwargs)``
        The skorch net class, its loss and extra net arguments.
    ``_validation_scoring(plan) -> (name, callback)``
        The per-epoch validation score (a skorch ``EpochScoring``).
    ``_validation_keys(plan) -> list of str``
        History keys of that score (kept in ``history_`` next to ``valid_loss``).
    ``_default_stopping``
        What ``early_stopping="auto"`` watches for a 2-D network: ``"loss"`` or ``"score"``
        (the first of the validation keys); a 3-D network watches the score.
    ``_strata_name``
        What the validation folds are stratified on, for messages (``"class"``).
    """

    _strata_name = "class"
    _default_stopping = "loss"

    _parameter_constraints: dict = {
        **BaseTorchImageEstimator._parameter_constraints,
        "strategy": [StrOptions(set(_STRATEGIES))],
        "freeze_depth": [Interval(Integral, 0, None, closed="left"), StrOptions({"auto"})],
        "gamma": [Interval(Real, 0, 1, closed="right")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 2, None, closed="left")],
        "augment": ["boolean", callable],
        "optimizer": [StrOptions(set(_OPTIMIZERS)), type],
        "optimizer_params": [dict, None],
        "num_workers": [Interval(Integral, 0, None, closed="left")],
        "precision": [StrOptions({"fp32", "bf16"})],
        "early_stopping": ["boolean", StrOptions({"auto", "loss", "score"})],
        "patience": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "validation_fraction": [Interval(Real, 0, 0.5, closed="right"), None],
        "lr_schedule": [StrOptions({"auto", "cosine", "warmup_cosine", "constant"})],
        "drop_rate": [Interval(Real, 0, 1, closed="left"), None],
        "callbacks": [list, tuple, None],
        "batch_size_predict": [Interval(Integral, 1, None, closed="left"), None],
        "n_estimators": [Interval(Integral, 1, None, closed="left")],
        "tta": ["boolean"],
        "random_state": ["random_state"],
    }

    # ----------------------------------------------------------------------------------------
    # preprocessing
    # ----------------------------------------------------------------------------------------
    def _early_stopping_monitor(self, plan: _FitPlan) -> tuple[str, bool]:
        """History key early stopping watches and whether lower is better."""
        kind = self.early_stopping
        if kind is True or kind == "auto":
            kind = "score" if self._volumetric else self._default_stopping
        if kind == "loss":
            return "valid_loss", True
        return self._validation_keys(plan)[0], False

    def _lr_schedule(self) -> str:
        """``lr_schedule``, with ``"auto"`` resolved (a warm-up for a 3-D network)."""
        if self.lr_schedule == "auto":
            return "warmup_cosine" if self._volumetric else "cosine"
        return self.lr_schedule

    def _patience(self) -> int:
        """``patience``, with ``"auto"`` resolved (shorter for a 3-D network)."""
        if isinstance(self.patience, str):
            return _VOLUME_PATIENCE if self._volumetric else _PATIENCE
        return int(self.patience)

    def _bs_pred(self) -> int:
        return int(self.batch_size_predict or 2 * self.batch_size)

    def _network_inputs(self, data) -> tuple[torch.Tensor, np.ndarray]:
        """Network input tensor of every network image of ``data`` and the owning sample."""
        xs, owners = [], []
        for x, _, owner in self.preprocessor_.iter_batches(data, range(len(data)), 256):
            xs.append(x)
            owners.append(owner)
        return torch.cat(xs), np.concatenate(owners)

    # ----------------------------------------------------------------------------------------
    def _resolve_structure(self, model, n_train, n_groups):
        layers = get_transfer_layers(model)
        L = len(layers)
        if self.strategy == "scratch":
            k, gamma = 0, 1.0
        elif self.strategy == "linear_probe":
            k, gamma = L - 1, 1.0
        else:
            gamma = float(self.gamma)
            if self.freeze_depth == "auto":
                from ._advisor import suggest_strategy

                advice = suggest_strategy(max(1, n_train), n_classes=n_groups, n_layers=L)
                k = int(advice.freeze_depth)
                if self._volumetric:  # 3-D networks: at least half of the layers frozen
                    k = max(k, min(L - 2, round(_VOLUME_MIN_FREEZE * L)))
            else:
                k = int(self.freeze_depth)
                if k > L - 1:
                    raise ValueError(
                        f"freeze_depth={self.freeze_depth!r} is too deep: {self.backbone!r} "
                        f"with its classifier has L={L} transfer layers, so freeze_depth must "
                        f"be in [0, {L - 1}] (use strategy='linear_probe' to train only the "
                        "head)."
                    )
        return layers, L, k, gamma

    def _plan(self, data, targets, *, n_out, weight, seed, windows, size, n_train) -> _FitPlan:
        """Network structure, preprocessing and (pretrained) prefix cache shared by members.

        ``targets`` holds one row per sample; each network image gets its sample's row.
        """
        in_chans = self._network_in_chans(self._intensity_channels(windows, data))
        pretrained = bool(self.pretrained) and self.strategy != "scratch"
        devices = [torch.device(self.device_).index or 0] if "cuda" in self.device_ else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(derive_seed(seed, "structure"))
            model = create_transfer_model(
                self.backbone,
                pretrained=pretrained,
                weights=self.weights,
                in_chans=in_chans,
                n_out=n_out,
                drop_rate=self.drop_rate,
                volumetric=self._network_kind(),
            )
        cfg = backbone_data_config(model)
        self._check_min_size(size, cfg["min_size"])
        self.preprocessor_ = self._make_preprocessor(
            size=size, windows=windows, in_chans=in_chans, mean=cfg["mean"], std=cfg["std"]
        )
        self.input_config_ = {
            "in_chans": in_chans,
            "mean": self.preprocessor_.mean,
            "std": self.preprocessor_.std,
            "input_size": tuple(size),
        }
        # a one-output (risk) head counts as two groups (events, censored) for the advisor
        layers, L, k, gamma = self._resolve_structure(model, n_train, max(2, n_out))
        layer_of = {f"model.{p}": layer.index for layer in layers for p in layer.param_names}
        self.n_layers_ = L
        self.layer_names_ = [layer.name for layer in layers]
        self.freeze_depth_ = k
        lr_of_layer = {
            layer.index: float(self.lr) * gamma ** (L - layer.index) for layer in layers
        }
        self.layer_lrs_ = {l: v for l, v in lr_of_layer.items() if l > k}
        frozen_params = {p for layer in layers[:k] for p in layer.param_names}
        # the frozen prefix is the same pretrained network for every member: computed once
        # (with random weights, pretrained=False, each member computes its own); the volumes
        # of a 3-D network are large, so their prefix is computed while they are preprocessed
        # and only its output is kept
        if self._volumetric and pretrained and self._train_transform() is None and k >= 1:
            X_img, owner, n_prefix, X_prefix = self._stream_prefix(
                data, model, k, layer_of, frozen_params
            )
        else:
            X_img, owner = self._network_inputs(data)
            n_prefix, X_prefix = self._prefix(X_img, model, k, layer_of, frozen_params, pretrained)
        self.cached_prefix_ = n_prefix
        return _FitPlan(
            pretrained=pretrained,
            in_chans=in_chans,
            n_out=n_out,
            X_img=X_img,
            owner=owner,
            y_rows=targets[torch.as_tensor(owner)],
            weight=weight,
            frozen_params=frozen_params,
            frozen_modules=[f"model.{m}" for layer in layers[:k] for m in layer.module_names],
            layer_of=layer_of,
            lr_of_layer=lr_of_layer,
            layer_names={layer.index: layer.name for layer in layers},
            n_prefix=n_prefix,
            X_prefix=X_prefix,
            use_valid=False,
            devices=devices,
        )

    def _prefix(self, X_img, model, k, layer_of, frozen_params, pretrained):
        """``(n_prefix, X_prefix)``: the cached frozen prefix of the network inputs."""
        n_prefix, X_prefix = 0, None
        if self._train_transform() is None and k >= 1:  # augmented inputs: no cache
            module = self._prefix_module(model, frozen_params)
            probe = X_img[: min(2, len(X_img))].to(self.device_)
            n_prefix = self._cacheable_stages(module, k, layer_of, probe, len(X_img))
            if n_prefix and pretrained:
                X_prefix = _run_prefix(module, X_img, n_prefix, self.device_, self._bs_pred())
        return n_prefix, X_prefix

    def _stream_prefix(self, data, model, k, layer_of, frozen_params):
        """``(X_img or None, owner, n_prefix, X_prefix)``, the prefix computed batch by batch.

        The network inputs are not kept when the prefix is cached (only its outputs are).
        """
        module = self._prefix_module(model, frozen_params)
        batches = self.preprocessor_.iter_batches(data, range(len(data)), self._bs_pred())
        first = next(batches)
        x0 = first[0].to(self.device_)
        n_prefix = self._cacheable_stages(module, k, layer_of, x0[:2], len(data))
        xs, owners = [], []
        for x, _, owner in itertools.chain([first], batches):
            if n_prefix:
                with torch.no_grad():
                    x = module.forward_stages(x.to(self.device_), 0, n_prefix).cpu()
            xs.append(x)
            owners.append(owner)
        X, owner = torch.cat(xs), np.concatenate(owners)
        return (None, owner, n_prefix, X) if n_prefix else (X, owner, 0, None)

    def _prefix_module(self, model, frozen_params) -> TransferModule:
        module = TransferModule(model).to(self.device_)
        for pname, p in model.named_parameters():
            p.requires_grad_(pname not in frozen_params)
        return module.eval()

    def _cacheable_stages(self, module, k, layer_of, probe, n_rows) -> int:
        """Stages of the frozen prefix whose output fits the cache for ``n_rows`` inputs."""
        n_prefix = prefix_stages(module, k, layer_of, probe)
        if n_prefix:
            with torch.no_grad():
                h0 = module.forward_stages(probe[:1], 0, n_prefix)
            if h0.numel() * 4 * n_rows > _MAX_CACHE_BYTES:
                n_prefix = 0
        return n_prefix

    def _network_kind(self) -> str | None:
        """The 3-D conversion of the network (None: the 2-D network)."""
        return self.volumetric if self._volumetric else None

    # ----------------------------------------------------------------------------------------
    def _fit_networks(
        self, data, targets, strata, *, n_out, weight, seed, size, windows, sample_weight=None
    ):
        """Fine-tune the ``n_estimators`` members and set the fitted-network attributes.

        ``targets`` (one row per sample) becomes the skorch target of the sample's network
        images; ``strata`` (one label per sample) stratifies the validation folds. With
        ``sample_weight`` (positive, see :meth:`_drop_zero_weights`), the weights are appended
        to the targets as their last column.
        """
        self.device_ = str(resolve_device(self.device))
        self._optimizer_spec()  # refuse a bad optimizer or transform before any work
        self._check_augment()
        n_members = int(self.n_estimators)
        if sample_weight is not None:
            w = torch.as_tensor(sample_weight, dtype=torch.float64)
            targets = torch.column_stack([targets.to(torch.float64), w])
        splits = self._validation_splits(strata, seed, n_members)
        use_valid = splits is not None
        if splits is None:
            splits = [(np.arange(len(data)), np.array([], dtype=int))] * n_members
        plan = self._plan(
            data,
            targets,
            n_out=n_out,
            weight=weight,
            seed=seed,
            windows=windows,
            size=size,
            n_train=int(splits[0][0].size),
        )
        plan.use_valid = use_valid
        plan.splits = splits if use_valid else None
        plan.sample_weighted = sample_weight is not None
        self._check_transform(plan)
        nets, histories, best_epochs = [], [], []
        for member, (tr_idx, va_idx) in enumerate(splits):
            net, history, best = fit_member(
                self,
                plan,
                seed=derive_seed(seed, "member", member),
                train_idx=tr_idx,
                valid_idx=va_idx,
            )
            nets.append(net)
            histories.append(history)
            best_epochs.append(best)
        self.nets_ = nets
        self.net_ = nets[0]
        self.histories_ = histories
        self.history_ = histories[0]
        self.best_epochs_ = best_epochs
        self.best_epoch_ = best_epochs[0]
        return plan

    def _validation_splits(self, strata, seed, n_members):
        """``[(train_idx, valid_idx)] * n_members`` or None (no validation split possible).

        One member: a split of ``validation_fraction`` stratified on ``strata``. Several
        members: a stratified K-fold with ``K = max(n_members, round(1 / validation_fraction))``
        whose first ``n_members`` folds are the members' validation sets (a cross-fitted
        ensemble: every image trains most members and no validation set overlaps another);
        when a stratum has fewer than ``K`` samples, independent stratified splits per member
        instead.
        """
        if self.validation_fraction is None:
            return None
        n = len(strata)
        counts = np.unique(strata, return_counts=True)[1]
        n_groups = counts.size
        n_val = max(n_groups, int(round(self.validation_fraction * n)))
        if counts.min() < 2 or n - n_val < n_groups:
            warnings.warn(
                f"{type(self).__name__}: too few samples per {self._strata_name} "
                f"({counts.tolist()}) for a stratified validation split of validation_fraction="
                f"{self.validation_fraction!r}; training without validation and early "
                "stopping.",
                UserWarning,
                stacklevel=4,
            )
            return None
        idx_all = np.arange(n)
        n_folds = max(n_members, int(round(1.0 / self.validation_fraction)))
        if n_members > 1 and counts.min() >= n_folds:
            folds = StratifiedKFold(
                n_folds, shuffle=True, random_state=derive_seed(seed, "validation folds")
            )
            splits = list(folds.split(idx_all, strata))[:n_members]
        else:  # one member, or too few samples per stratum for disjoint folds: random splits
            splits = [
                train_test_split(
                    idx_all,
                    test_size=n_val,
                    stratify=strata,
                    random_state=derive_seed(seed, "validation split", member),
                )
                for member in range(n_members)
            ]
        return [(np.sort(tr), np.sort(va)) for tr, va in splits]

    def _make_net(self, module, ds_valid, plan: _FitPlan, *, n_rows_train):
        """The skorch net of one member (callbacks, layer-wise optimizer, data loaders)."""
        from skorch.callbacks import EarlyStopping, LRScheduler
        from skorch.helper import predefined_split

        use_valid = ds_valid is not None
        cbs = [("skrtl_freeze_bn", FreezeBatchNorm(plan.frozen_modules))]
        if use_valid:
            cbs.append(self._validation_scoring(plan))
        # BatchNorm cannot train on a last batch of one sample
        drop_last = n_rows_train > self.batch_size and n_rows_train % self.batch_size == 1
        schedule_kind = self._lr_schedule()
        if schedule_kind == "cosine":
            cbs.append(
                ("lr_scheduler", LRScheduler(policy="CosineAnnealingLR", T_max=self.max_epochs))
            )
        elif schedule_kind == "warmup_cosine":  # stepped per batch
            steps = n_rows_train // self.batch_size  # batches per epoch
            steps = steps if drop_last else -(-n_rows_train // self.batch_size)
            schedule = WarmupCosine(steps, steps * self.max_epochs)
            cbs.append(
                (
                    "lr_scheduler",
                    LRScheduler(
                        policy=torch.optim.lr_scheduler.LambdaLR,
                        lr_lambda=schedule,
                        step_every="batch",
                    ),
                )
            )
        if use_valid and self.early_stopping:
            monitor, lower_is_better = self._early_stopping_monitor(plan)
            cbs.append(
                (
                    "early_stopping",
                    EarlyStopping(
                        monitor=monitor,
                        lower_is_better=lower_is_better,
                        patience=self._patience(),
                        load_best=True,
                        sink=print if self.verbose else _silent,
                    ),
                )
            )
        for i, cb in enumerate(self.callbacks or []):
            cbs.append(cb if isinstance(cb, tuple | list) else (f"user_{i}", cb))
        names = [pn for pn, _ in module.named_parameters()]
        optimizer_class, optimizer_kwargs, weight_decay = self._optimizer_spec()
        optimizer = LayerwiseOptimizer(
            names,
            plan.layer_of,
            plan.lr_of_layer,
            plan.layer_names,
            weight_decay,
            optimizer=optimizer_class,
        )
        net_class, criterion, net_kwargs = self._net_options(plan)
        net_kwargs.update({f"optimizer__{key}": v for key, v in optimizer_kwargs.items()})
        transform = self._train_transform()
        if transform is not None:  # per-sample seeds from the member's (forked) generator
            builtin = isinstance(transform, LightAugment)
            mean, std = (None, None) if builtin else self._input_normalisation()
            net_kwargs["iterator_train"] = SampleAugmentLoader(
                copy.deepcopy(transform),
                seed=int(torch.randint(0, 2**62, ()).item()),
                mean=mean,
                std=std,
                loader=net_kwargs.get("iterator_train"),
            )
        if self.num_workers:
            net_kwargs["iterator_train__num_workers"] = int(self.num_workers)
            # not "fork": forking a process whose OpenMP / inference-runtime threads are
            # running can crash or deadlock the children (and the worker that forked them)
            net_kwargs["iterator_train__multiprocessing_context"] = "forkserver"
        return net_class(
            module,
            criterion=criterion,
            optimizer=optimizer,
            lr=float(self.lr),
            max_epochs=int(self.max_epochs),
            batch_size=int(self.batch_size),
            iterator_train__shuffle=True,
            iterator_train__drop_last=drop_last,
            iterator_valid__batch_size=self._bs_pred(),
            train_split=predefined_split(ds_valid) if use_valid else None,
            callbacks=cbs,
            device=self.device_,
            verbose=int(self.verbose),
            **net_kwargs,
        )

    # ----------------------------------------------------------------------------------------
    # options: augmentation, optimizer, sample weights
    # ----------------------------------------------------------------------------------------
    def _train_transform(self):
        """The per-sample training transform: None, the built-in or the user's callable."""
        if callable(self.augment):  # before truth: an empty Compose may have len() == 0
            return self.augment
        return LightAugment() if self.augment else None

    def _input_normalisation(self):
        """Per-channel ``(mean, std)`` of the network input (one value for all channels)."""
        mean, std = list(self.preprocessor_.mean), list(self.preprocessor_.std)
        if len(mean) != self.preprocessor_.in_chans:
            mean, std = [float(np.mean(mean))], [float(np.mean(std))]
        return mean, std

    def _check_augment(self) -> None:
        """Refuse a user transform that scikit-learn cannot clone."""
        transform = self._train_transform()
        if hasattr(transform, "get_params") and not hasattr(transform, "set_params"):
            raise ValueError(
                f"augment={transform!r} has a get_params method that is not scikit-learn's "
                "(torchvision's transforms use that name for their random-parameter "
                "sampler), so clone, GridSearchCV and get_params would fail on the "
                "estimator. Wrap the transform in a container: "
                "augment=torchvision.transforms.v2.Compose([transform])."
            )

    def _check_transform(self, plan: _FitPlan) -> None:
        """Refuse a user transform that changes the shape or dtype of a network image."""
        transform = self._train_transform()
        if transform is None or isinstance(transform, LightAugment):
            return
        x = plan.X_img[0]
        mean, std = self._input_normalisation()
        shape = (-1,) + (1,) * (x.ndim - 1)
        x = x * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
        apply_sample_transform(copy.deepcopy(transform), x, 0)

    def _optimizer_spec(self):
        """``(optimizer class, extra arguments, weight decay or None)`` of the optimizer."""
        opt = self.optimizer
        if isinstance(opt, str):
            cls, defaults = _OPTIMIZERS[opt]
        elif isinstance(opt, type) and issubclass(opt, torch.optim.Optimizer):
            cls, defaults = opt, {}
        else:
            raise ValueError(
                f"optimizer must be one of {sorted(_OPTIMIZERS)!r} or a torch.optim.Optimizer "
                f"subclass (e.g. torch.optim.RMSprop), got {opt!r}."
            )
        params = dict(self.optimizer_params or {})
        reserved = {
            "params": "the parameter groups are built from the transfer layers",
            "lr": "use lr (and gamma for the layer-wise rates)",
            "weight_decay": "use the weight_decay parameter",
        }
        for key, why in reserved.items():
            if key in params:
                raise ValueError(
                    f"optimizer_params={self.optimizer_params!r} sets {key!r}: {why}."
                )
        sig = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values())
        allowed = {n for n in sig if n not in ("self", "params")} - {"lr", "weight_decay"}
        unknown = sorted(set(params) - allowed)
        if unknown and not takes_any:
            raise ValueError(
                f"optimizer_params={self.optimizer_params!r} has {unknown!r}, which "
                f"{cls.__name__} does not take; it takes {sorted(allowed)!r}."
            )
        weight_decay = float(self.weight_decay)
        if "weight_decay" not in sig and not takes_any:
            if weight_decay > 0:
                raise ValueError(
                    f"weight_decay={self.weight_decay!r} but optimizer {cls.__name__} has no "
                    "weight_decay argument; set weight_decay=0."
                )
            weight_decay = None
        return cls, {**defaults, **params}, weight_decay

    def _drop_zero_weights(self, X, data, sample_weight):
        """``(data, keep)``: the image input without the samples of weight 0 and the indices of
        the others (``keep`` is None when every weight is positive or there are none).

        Samples of weight 0 are removed before anything is computed, so the fit is exactly
        the one without them (preprocessing, validation folds, batches).
        """
        if sample_weight is None or np.all(sample_weight > 0):
            return data, None
        keep = np.flatnonzero(sample_weight > 0)
        return self._read(_safe_indexing(X, keep)), keep

    def _check_fit_sample_weight(self, sample_weight, n: int):
        """Validated float64 sample weights of shape ``(n,)``, or None."""
        if sample_weight is None:
            return None
        try:
            sw = np.asarray(sample_weight, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"sample_weight must be an array of {n} non-negative numbers, got "
                f"{sample_weight!r}."
            ) from exc
        if sw.ndim == 0:
            sw = np.full(n, float(sw))
        if sw.shape != (n,):
            raise ValueError(
                f"sample_weight has shape {sw.shape!r}; X has {n} samples, so it must have "
                f"shape ({n},)."
            )
        if not np.all(np.isfinite(sw)) or np.any(sw < 0):
            raise ValueError(
                "sample_weight must be finite and non-negative, got values "
                f"{sw[~np.isfinite(sw) | (sw < 0)][:5].tolist()!r}."
            )
        if sw.sum() <= 0:
            raise ValueError(
                "sample_weight sums to 0: every sample would be ignored. Give some samples a "
                "positive weight."
            )
        return sw

    def _history(self, net, plan: _FitPlan):
        keys = ["epoch", "train_loss", "dur"]
        if plan.use_valid:
            keys += ["valid_loss", *self._validation_keys(plan)]
        rows = []
        for h in net.history:
            row = {key: h[key] for key in keys if key in h}
            row = {key: (int(v) if key == "epoch" else float(v)) for key, v in row.items()}
            if "event_lr" in h:
                row["lr"] = float(h["event_lr"])
            rows.append(row)
        return rows

    # ----------------------------------------------------------------------------------------
    # the torch network protocol (skrtl._base.TorchNetworkMixin) and prediction
    # ----------------------------------------------------------------------------------------
    def _skrtl_torch_module(self) -> nn.Module:
        check_is_fitted(self, "net_")
        if len(self.nets_) == 1:
            return self.net_.module_
        return EnsembleModule([net.module_ for net in self.nets_])

    def _skrtl_iter_inputs(self, X, batch_size=None):
        """Yield ``(x, idx)``: network input batches and the sample index of each row."""
        check_is_fitted(self, "net_")
        data = self._read(X)
        bs = int(batch_size or self._bs_pred())
        dev = self._module_device()
        for x, _, owners in self.preprocessor_.iter_batches(data, range(len(data)), bs):
            yield x.to(dev), owners

    def _skrtl_network_copy(self):
        """A copy of this fitted estimator whose nets own private copies of their modules."""
        check_is_fitted(self, "net_")
        new = copy.copy(self)
        new.nets_ = [_net_with_module_copy(net) for net in self.nets_]
        new.net_ = new.nets_[0]
        return new

    def _module_device(self):
        for p in self.net_.module_.parameters():
            return p.device
        return torch.device("cpu")  # pragma: no cover

    def _member_outputs(self, X, output) -> np.ndarray:
        """``output(logits)`` of every member for the images ``X`` (see :meth:`_forward_members`).

        Returns
        -------
        ndarray of shape (n_members, n_samples, n_outputs)
        """
        check_is_fitted(self, "net_")
        data = self._read(X)
        return self._forward_members(self._input_batches(data), len(data), output)

    def _input_batches(self, data):
        """Yield ``(x, owner)`` network input batches of every sample of ``data``."""
        bs = self._bs_pred()
        for x, _, owner in self.preprocessor_.iter_batches(data, range(len(data)), bs):
            yield x, owner

    def _fit_outputs(self, plan: _FitPlan, data, output) -> np.ndarray:
        """:meth:`_forward_members` on the training images (their inputs kept by ``plan``)."""
        if plan.X_img is None:
            return self._forward_members(self._input_batches(data), len(data), output)
        bs = self._bs_pred()
        batches = (
            (plan.X_img[i : i + bs], plan.owner[i : i + bs]) for i in range(0, len(plan.owner), bs)
        )
        return self._forward_members(batches, len(data), output)

    def _tta_flips(self) -> tuple[tuple[int, ...], ...]:
        """Axes flipped by each test-time view (``()``: the input itself)."""
        if not self.tta:
            return ((),)
        if self.preprocessor_.is_volumetric:
            return _VOLUME_TTA_FLIPS
        return ((), (-1,))

    def _validation_outputs(self, plan: _FitPlan, data, output) -> np.ndarray | None:
        """Out-of-fold ``output(logits)`` of the training samples (None: no validation).

        Every sample of a member's validation fold is predicted by that member alone (with
        the test-time views of :meth:`_forward_members`); a sample in several validation folds
        (independent random splits) gets the mean, a sample in none ``NaN``.

        Returns
        -------
        ndarray of shape (n_samples, n_outputs) or None
        """
        if plan.splits is None:
            return None
        bs = self._bs_pred()
        total, count = None, np.zeros(len(data))
        for m, (_, va) in enumerate(plan.splits):
            if va.size == 0:
                continue
            if plan.X_img is None:  # inputs not kept (3-D prefix streamed): preprocess again
                batches = (
                    (x, owner) for x, _, owner in self.preprocessor_.iter_batches(data, va, bs)
                )
            else:
                rows = np.flatnonzero(np.isin(plan.owner, va))
                batches = (
                    (plan.X_img[rows[i : i + bs]], plan.owner[rows[i : i + bs]])
                    for i in range(0, rows.size, bs)
                )
            out = self._forward_members(batches, len(data), output, nets=[self.nets_[m]])[0]
            if total is None:
                total = np.zeros_like(out)
            total[va] += out[va]
            count[va] += 1
        result = np.full_like(total, np.nan)
        seen = count > 0
        result[seen] = total[seen] / count[seen, None]
        return result

    def _forward_members(self, batches, n: int, output, nets=None) -> np.ndarray:
        """``output(logits)`` of every member, averaged per sample over views and images.

        ``batches`` yields ``(x, owner)``: network inputs and the sample of each row (one
        batch of inputs is held at a time); ``nets`` (default: every member) are the nets
        to run, and a sample without any input row gets ``NaN``. The views are the image
        and, with ``tta``, its mirror image (a volume of a 3-D network: its mirror images
        along the three axes); the images of a sample are its slices (slice-wise
        ``mode="3d"``) or the image itself.

        Returns
        -------
        ndarray of shape (n_members, n, n_outputs)
        """
        nets = self.nets_ if nets is None else nets
        dev = self._module_device()
        flips = self._tta_flips()
        sums: list = [None] * len(nets)
        counts = np.zeros(n)
        with torch.no_grad():
            for x, idx in batches:
                xb = x.to(dev)
                for dims in flips:
                    xv = xb.flip(dims) if dims else xb
                    for m, net in enumerate(nets):
                        out = output(_eval_forward(net.module_, xv).float()).cpu().numpy()
                        if sums[m] is None:
                            sums[m] = np.zeros((n, out.shape[1]))
                        np.add.at(sums[m], idx, out)
                    np.add.at(counts, idx, 1)
        if sums[0] is None:  # no batch at all
            return np.full((len(nets), n, 1), np.nan)
        seen = counts > 0
        out = np.full((len(nets), n, sums[0].shape[1]), np.nan)
        for m, s_ in enumerate(sums):
            out[m, seen] = s_[seen] / counts[seen, None]
        return out


class FineTuneClassifier(ImageEstimatorMixin, ClassifierMixin, BaseFineTune):
    """Fine-tune a pretrained CNN on images (scratch, linear probe or layer-wise fine-tuning).

    Parameters
    ----------
    backbone : str, default="tf_efficientnet_lite0"
        timm architecture; the default has embedded ImageNet weights (works offline).
    weights : str or Path, optional
        Local weights file for ``backbone`` (see :func:`skrtl.load_backbone`).
    pretrained : bool, default=True
        Start from pretrained weights. ``False`` starts from random weights whatever the
        strategy (useful for tests and for ablations); ``strategy="scratch"`` implies it.
    strategy : {"finetune", "linear_probe", "scratch"}, default="finetune"
        ``"finetune"``: layers ``1..freeze_depth`` frozen, the rest trained with
        discriminative learning rates. ``"linear_probe"``: only the new classifier (layer
        ``L``) trains, ``freeze_depth`` and ``gamma`` are ignored. ``"scratch"``: random
        initialisation, every layer trains with the same rate ``lr``.
    freeze_depth : int or "auto", default="auto"
        Number ``k`` of frozen transfer layers (``0`` = none, at most ``L - 1``), counted by
        :func:`skrtl.get_transfer_layers` on the backbone *with* its classifier (``L`` is the
        new head; the default backbone has ``L = 10``). ``"auto"`` asks
        :func:`~skrtl._advisor.suggest_strategy` given the number of training samples; for a
        3-D network (``volumetric="acs"`` / ``"inflate"``) at least half of the layers
        (``round(L / 2)``, 5 for the default backbone). Only used by ``strategy="finetune"``.
    gamma : float in (0, 1], default=0.7
        Layer-wise learning-rate decay: layer ``l`` trains with ``lr * gamma ** (L - l)``.
    lr : float, default=1e-3
        Learning rate of the classifier (``alpha_max``); layer ``l`` starts at
        ``lr * gamma ** (L - l)``.
    weight_decay : float, default=1e-4
        Weight decay of the optimizer (decoupled for AdamW, an L2 penalty for Adam and SGD).
    optimizer : {"adamw", "adam", "sgd"} or torch.optim.Optimizer subclass, default="adamw"
        The optimizer of the layer-wise parameter groups: ``"adamw"``
        (:class:`torch.optim.AdamW`), ``"adam"``, ``"sgd"`` (:class:`torch.optim.SGD` with
        ``momentum=0.9``) or any optimizer class taking parameter groups and ``lr`` (e.g.
        ``torch.optim.RMSprop``, with its own defaults). Every trainable layer is one
        parameter group with its own learning rate, whatever the optimizer.
    optimizer_params : dict or None, default=None
        Further arguments of the optimizer (e.g. ``{"momentum": 0.8, "nesterov": True}`` or
        ``{"betas": (0.9, 0.99)}``); they override the defaults above. ``lr`` and
        ``weight_decay`` are parameters of the estimator and cannot be set here.
    max_epochs : int, default=15
    batch_size : int, default=32
    precision : {"fp32", "bf16"}, default="fp32"
        Arithmetic of the network's forward passes in training and prediction. ``"bf16"``
        runs them under bfloat16 autocast (``torch.autocast``; weights, gradients and the
        optimizer stay float32), meant for GPUs and CPUs with bfloat16 kernels (AVX512-BF16 /
        AMX); the frozen-prefix cache is computed in float32 either way. On the 2-core CPU of
        the benchmarks it barely sped up full fine-tuning and not the default (prefix-cached)
        one: ``docs/benchmarks.md`` gives the measured speed and accuracy; fp32 is the default.
    num_workers : int, default=0
        Worker processes of the training DataLoader (``0``: load in the main process). The
        network inputs are preprocessed once before training, so workers pay off when a
        per-sample ``augment`` transform is expensive. Results do not depend on it: shuffling
        and the augmentation seeds are drawn in the main process. skorch builds the loader
        for every epoch, so workers are started for every epoch (``persistent_workers`` would
        not keep them). They start from a ``"forkserver"``, not by forking this process:
        forking while OpenMP or inference-runtime threads run can crash the children.
    input_size : int, (int, int), (int, int, int) or "auto", default="auto"
        Images are resized (bilinear, antialiased) to this size (height, width); volumes of a
        3-D network to (depth, height, width) (an int: a cube). ``"auto"``: 128 for images and
        2-D network slices, 48 (a 48^3 cube) for the volumes of a 3-D network.
    mode : {"2d", "2.5d", "3d"}, default="2d"
        Input kind. ``"2.5d"``: planes through the lesion centre (or the volume centre) as
        the channels, see ``slices``. ``"3d"``: volumes, run as set by ``volumetric``.
    volumetric : {"slices", "acs", "inflate"}, default="slices"
        How ``mode="3d"`` runs the network. ``"slices"``: slice-wise; every axial slice (those
        containing the mask, when masks are given) is a training image with its volume's
        label, and predicted probabilities are averaged over the slices of a volume.
        ``"acs"`` / ``"inflate"``: the whole volume goes through a 3-D network made from the
        pretrained 2-D one (:func:`skrtl.convert_to_3d`: ACS convolutions, or I3D-inflated
        kernels). Its transfer layers are the 2-D network's, so ``freeze_depth``, ``gamma``,
        the prefix cache, the ensemble, TTA and AdaBN work as in 2-D (see
        ``docs/finetune.md``).
    slices : {"orthogonal", "adjacent"}, default="orthogonal"
        2.5-D planes: the three orthogonal planes, or ``n_slices`` adjacent axial slices.
    n_slices : int, default=3
        Number of adjacent slices for ``slices="adjacent"``.
    intensity : {"auto", "window", "percentile", "minmax", "uint8", "none"}, default="auto"
        Intensity scaling to [0, 1], the same preprocessing as
        :class:`~skrtl.PretrainedCNNFeatures` (:mod:`skrtl._preprocess`): ``"auto"`` is
        ``"window"`` with ``windows``, ``"uint8"`` for ``uint8`` images, else
        ``"percentile"``.
    windows : list of (level, width), optional
        CT windows (one input channel each) for ``intensity="window"`` / ``"auto"``.
    percentiles : (float, float), default=(0.5, 99.5)
        Clip range of ``intensity="percentile"``.
    augment : bool or callable, default=False
        Augmentation of every training image (never of validation images, never at predict
        time). ``True``: the built-in light augmentation (horizontal flip, rotation up to 10
        degrees, shift up to 5 %, contrast / brightness jitter; for volumes the rotation is in
        the axial plane and the shift along every axis). A callable: a per-sample
        transform, e.g. a ``torchvision.transforms.v2.Compose`` or a MONAI array transform.
        It receives one image as a ``(C, H, W)`` float32 tensor (``C`` =
        ``input_config_["in_chans"]``, ``(H, W)`` = ``input_size``; a ``(C, D, H, W)`` volume for
        a 3-D network) with intensities as
        scaled by ``intensity`` (in [0, 1], before the backbone's mean / std normalisation)
        and must return a tensor of the same shape and dtype; anything else is an error.
        Every sample of every epoch gets its own seed, derived from ``random_state``: torch's,
        NumPy's and Python's global generators are seeded for the call (and restored), and a
        MONAI ``Randomizable`` gets ``set_random_state``, so fits are reproducible with any
        ``num_workers``. A transform with torchvision's static ``get_params`` (e.g. a bare
        ``v2.RandomAffine``) must be wrapped in ``v2.Compose`` for scikit-learn's ``clone``.
        Without augmentation, frozen layers are computed once per image (frozen-prefix
        caching), which makes epochs much cheaper; any augmentation switches the cache off.
    class_weight : "balanced", dict or None, default=None
        Class weights of the cross-entropy loss.
    threshold : {"auto", "accuracy"} or float in (0, 1), default="auto"
        Decision threshold of :meth:`predict` for two classes: ``classes_[1]`` when its
        probability exceeds the threshold. ``"auto"`` chooses it on the out-of-fold
        probabilities of the members' validation folds (``validation_proba_``, no refit) to
        maximise the balanced accuracy, which does not depend on the class prevalence.
        ``"accuracy"`` maximises the accuracy on them instead: the better choice when new
        data have the training prevalence and errors of both kinds cost the same, the worse
        one when the prevalence differs. Both are 0.5 without a validation split. A float
        fixes it (``0.5``: the most probable class). :meth:`predict_proba` does not depend
        on it; multi-class predictions are always the most probable class.
    early_stopping : {"auto", "loss", "score"} or bool, default="auto"
        Stop when the watched validation quantity has not improved for ``patience`` epochs
        and restore the weights of the best epoch: ``"loss"`` watches the validation loss,
        ``"score"`` the validation score (the AUC for two classes, else the accuracy).
        ``"auto"`` (or ``True``): the score for a 3-D network (``volumetric="acs"`` /
        ``"inflate"``, see ``docs/finetune.md``), else the loss. ``False``: no early
        stopping. Needs ``validation_fraction``.
    patience : int or "auto", default="auto"
        Epochs without improvement before stopping. ``"auto"``: 5, or 2 for a 3-D network
        (whose members stop improving after a few epochs, see ``docs/finetune.md``).
    validation_fraction : float in (0, 0.5] or None, default=0.15
        Size of the internal stratified validation split (``None``: no split, no early
        stopping, no validation history).
    lr_schedule : {"auto", "cosine", "warmup_cosine", "constant"}, default="auto"
        ``"cosine"``: cosine annealing of every group's learning rate over ``max_epochs``
        (stepped per epoch); ``"warmup_cosine"``: a linear warm-up over the first epoch's
        batches, then cosine annealing to zero at ``max_epochs`` (stepped per batch);
        ``"constant"``: no schedule. ``"auto"``: ``"warmup_cosine"`` for a 3-D network
        (``volumetric="acs"`` / ``"inflate"``, see ``docs/finetune.md``), else ``"cosine"``.
    drop_rate : float or None, default=None
        Dropout before the classifier (``None``: the timm default of the backbone).
    callbacks : list or None, default=None
        Extra skorch callbacks (instances or ``(name, callback)`` tuples); they run after the
        built-in scoring, so ``net.history`` already holds ``valid_loss`` and
        ``valid_auc`` (binary) / ``valid_acc`` of the epoch (e.g. for Optuna pruning).
    batch_size_predict : int or None, default=None
        Batch size for prediction (``None``: ``2 * batch_size``).
    n_estimators : int, default=5
        Number of fine-tuned networks whose predicted probabilities are averaged. With a
        validation split they form a cross-fitted ensemble: the training data are cut into
        ``max(n_estimators, round(1 / validation_fraction))`` stratified folds and member
        ``i`` uses fold ``i`` for early stopping and the rest for training, so every image
        trains most members (a class too small for the folds: a random stratified split per
        member). The frozen prefix is computed once for all members. An ensemble costs
        ``n_estimators`` times the training time of one network and removes much of the
        variance a single network has with its seed and validation split (measured in
        ``docs/benchmarks.md``); use ``n_estimators=1`` for quick experiments and inside
        hyper-parameter searches.
    tta : bool, default=True
        Test-time augmentation: average the predictions on each image and on its horizontal
        mirror image (the mirror is also one of the training augmentations); for the volumes
        of a 3-D network, on the volume and its mirror images along the width, height and
        depth axes. Set it to ``False`` when left and right carry meaning for the label.
    device : str, default="auto"
        ``"auto"``: CUDA when available, else CPU.
    random_state : int, RandomState instance or None, default=None
        Seeds the validation split, head initialisation, shuffling, dropout and augmentation
        (through a forked, locally seeded torch RNG).
    verbose : int, default=0
        ``> 0``: skorch prints a table of epochs.

    Attributes
    ----------
    net_ : skorch.NeuralNetClassifier
        The trained skorch net of the first member; ``net_.module_`` wraps the timm model,
        ``net_.optimizer_`` holds one parameter group per trainable layer.
    nets_ : list of skorch.NeuralNetClassifier
        The ``n_estimators`` trained members (``nets_[0] is net_``).
    classes_ : ndarray of shape (n_classes,)
    n_layers_ : int
        Number ``L`` of transfer layers (classifier included).
    layer_names_ : list of str
        Transfer-layer names, index ``l - 1`` for layer ``l``.
    freeze_depth_ : int
        Effective number of frozen layers.
    layer_lrs_ : dict
        Initial learning rate of every trainable layer ``{l: lr}``.
    history_ : list of dict
        One dict per epoch of the first member with ``"epoch"``, ``"train_loss"``, ``"dur"``,
        ``"lr"`` and, with a validation split, ``"valid_loss"`` and ``"valid_auc"`` (binary)
        or ``"valid_acc"``.
    histories_ : list of list of dict
        ``history_`` of every member.
    best_epoch_ : int or None
        Epoch whose weights were restored by early stopping (first member).
    best_epochs_ : list of int or None
        ``best_epoch_`` of every member.
    cached_prefix_ : int
        Number of network stages whose output was cached (0 = no caching).
    threshold_ : float or None
        Decision threshold of :meth:`predict` on ``predict_proba(X)[:, 1]`` (None for more
        than two classes).
    validation_proba_ : ndarray of shape (n_samples, n_classes) or None
        Out-of-fold probabilities of the training samples: each sample of a member's
        validation fold predicted by that member alone, with ``tta``; ``NaN`` for samples
        in no validation fold, None without a validation split. Early stopping chose each
        member's epoch on the same fold, so scores computed from them are slightly
        optimistic.
    input_config_ : dict
        Channels, mean, std and input size used to build network inputs.
    preprocessor_ : ImagePreprocessor
        The preprocessing from images to network input, shared with every torch estimator.
    device_ : str

    Notes
    -----
    Inside :class:`~sklearn.model_selection.GridSearchCV` every ``fit`` starts again from the
    pretrained weights (held in memory once per process) with a new head. Training time grows
    linearly with ``n_estimators``; the per-epoch callbacks (``callbacks``) run for every
    member. Frozen layers keep their BatchNorm statistics (:class:`~skrtl._callbacks.
    FreezeBatchNorm`). The layer-wise learning rates are real optimizer parameter groups
    (:func:`~skrtl._transfer.layerwise_param_groups`). Prediction is safe to call from several
    threads at once; ``fit`` is not (as for any scikit-learn estimator).

    Examples
    --------
    >>> import numpy as np
    >>> from skrtl import FineTuneClassifier
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.random((12, 32, 32)), np.repeat([0, 1], 6)
    >>> clf = FineTuneClassifier(input_size=32, max_epochs=1, n_estimators=1, random_state=0)
    >>> clf = clf.fit(X, y)
    >>> clf.predict_proba(X).shape
    (12, 2)
    """

    _AUTO_INPUT_SIZE = 128
    _AUTO_VOLUME_SIZE = 48

    _parameter_constraints: dict = {
        **BaseFineTune._parameter_constraints,
        "class_weight": [StrOptions({"balanced"}), dict, None],
        "threshold": [StrOptions({"auto", "accuracy"}), Interval(Real, 0, 1, closed="neither")],
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
        batch_size=32,
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
        class_weight=None,
        threshold="auto",
        early_stopping="auto",
        patience="auto",
        validation_fraction=0.15,
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
        self.class_weight = class_weight
        self.threshold = threshold
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

    def _check_y(self, y):
        y = check_class_labels(y, estimator_name=type(self).__name__)
        classes, y_enc = np.unique(y, return_inverse=True)
        if classes.size < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 classes in y, got {classes.size} "
                f"({classes!r})."
            )
        return classes, y_enc

    # ----------------------------------------------------------------------------------------
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Fine-tune the network on images ``X`` with labels ``y``.

        Parameters
        ----------
        X : ndarray or image frame
            ``(n, H, W)`` / ``(n, H, W, C)`` images (``mode="2d"``), ``(n, D, H, W)`` volumes,
            or an image frame from :func:`skrtl.make_image_frame`.
        y : array-like of shape (n,)
            Class labels.
        sample_weight : array-like of shape (n,), optional
            Non-negative weight of every sample. The loss of a batch is the weighted mean
            ``sum_i w_i c_i l_i / sum_i w_i c_i`` of the per-image cross-entropies ``l_i``
            (``c_i``: the ``class_weight`` of the label), so an integer weight counts a sample
            that many times. The validation loss that early stopping watches and the
            validation AUC / accuracy are weighted the same way. Samples of weight 0 are left
            out of training and of the validation folds, exactly as if they were not in
            ``X``. ``class_weight="balanced"`` uses the weighted class totals. Routed by
            metadata routing: ``set_fit_request(sample_weight=True)``.

        Returns
        -------
        self
        """
        size, windows = self._check_image_params()
        data = self._read(X)
        n = len(data)
        y_arr = np.asarray(y)
        if y_arr.shape[0] != n:
            raise ValueError(f"X has {n} samples but y has {y_arr.shape[0]}.")
        self.classes_, y_enc = self._check_y(y)
        sw = self._check_fit_sample_weight(sample_weight, n)
        if sw is not None:
            totals = np.bincount(y_enc, weights=sw, minlength=len(self.classes_))
            if np.any(totals <= 0):
                raise ValueError(
                    f"sample_weight is 0 for every sample of the class(es) "
                    f"{self.classes_[totals <= 0].tolist()!r}; drop those samples from X and "
                    "y, or give some of them a positive weight."
                )
        data, keep = self._drop_zero_weights(X, data, sw)
        if keep is not None:
            y_arr, y_enc, sw = y_arr[keep], y_enc[keep], sw[keep]
        plan = self._fit_networks(
            data,
            torch.as_tensor(y_enc, dtype=torch.int64),
            y_enc,
            n_out=len(self.classes_),
            weight=self._class_weight_tensor(y_arr, sw),
            seed=root_seed(self.random_state),
            size=size,
            windows=windows,
            sample_weight=sw,
        )
        oof = self._validation_outputs(plan, data, lambda logits: torch.softmax(logits, dim=1))
        self.threshold_ = self._decision_threshold(oof, y_enc, sw)
        if oof is not None and keep is not None:  # rows of X (weight-0 samples: NaN)
            full = np.full((n, oof.shape[1]), np.nan)
            full[keep] = oof
            oof = full
        self.validation_proba_ = oof
        return self

    def _decision_threshold(self, oof, y_enc, sw) -> float | None:
        """``threshold_``: fixed, chosen on the out-of-fold probabilities, or None."""
        if len(self.classes_) != 2:
            return None
        if self.threshold not in ("auto", "accuracy"):
            return float(self.threshold)
        if oof is None:
            return 0.5
        seen = ~np.isnan(oof[:, 1])
        y_seen = y_enc[seen]
        if np.unique(y_seen).size < 2:
            return 0.5
        return choose_threshold(
            y_seen,
            oof[seen, 1],
            metric="accuracy" if self.threshold == "accuracy" else "balanced_accuracy",
            sample_weight=None if sw is None else sw[seen],
        )

    def _class_weight_tensor(self, y, sample_weight=None):
        if self.class_weight is None:
            return None
        cw = self.class_weight
        if isinstance(cw, dict):
            unknown = set(cw) - set(self.classes_.tolist())
            if unknown:
                raise ValueError(
                    f"class_weight has labels {sorted(unknown, key=str)!r} that are not "
                    f"in y (classes: {self.classes_.tolist()!r})."
                )
        if cw == "balanced" and sample_weight is not None:  # weighted class totals
            totals = np.array([sample_weight[np.asarray(y) == c].sum() for c in self.classes_])
            weight = totals.sum() / (len(self.classes_) * totals)
        else:
            weight = compute_class_weight(cw, classes=self.classes_, y=np.asarray(y))
        return torch.as_tensor(weight, dtype=torch.float32)

    # hooks of BaseFineTune
    def _net_options(self, plan: _FitPlan):
        from skorch import NeuralNetClassifier

        kwargs = {"classes": np.arange(plan.n_out), "callbacks__valid_acc": None}
        if plan.weight is not None:
            kwargs["criterion__weight"] = plan.weight
        criterion = SampleWeightedCrossEntropy if plan.sample_weighted else nn.CrossEntropyLoss
        return NeuralNetClassifier, criterion, kwargs

    def _validation_scoring(self, plan: _FitPlan):
        return validation_scoring(plan.n_out)

    def _validation_keys(self, plan: _FitPlan):
        return ["valid_auc" if plan.n_out == 2 else "valid_acc"]

    # ----------------------------------------------------------------------------------------
    # prediction
    # ----------------------------------------------------------------------------------------
    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (averaged over the slices of slice-wise ``mode="3d"``).

        Parameters
        ----------
        X : ndarray or image frame

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        return self._member_outputs(X, lambda logits: torch.softmax(logits, dim=1)).mean(0)

    def decision_function(self, X) -> np.ndarray:
        """Binary: log-odds of the positive class minus ``logit(threshold_)`` (positive
        exactly when :meth:`predict` gives ``classes_[1]``); multi-class: log-probabilities."""
        proba = np.clip(self.predict_proba(X), 1e-12, 1.0)
        if proba.shape[1] == 2:
            t = self.threshold_
            return np.log(proba[:, 1]) - np.log(proba[:, 0]) - float(np.log(t / (1 - t)))
        return np.log(proba)

    def predict(self, X) -> np.ndarray:
        """Class of each sample: ``classes_[1]`` when its probability exceeds ``threshold_``
        (binary), else the most probable class."""
        proba = self.predict_proba(X)
        if proba.shape[1] == 2:
            return self.classes_[(proba[:, 1] > self.threshold_).astype(int)]
        return self.classes_[np.argmax(proba, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.random_state is None
        tags.classifier_tags.multi_class = True
        tags.classifier_tags.poor_score = True
        return tags


class SampleWeightedCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy with per-sample weights carried in the target.

    ``loss(logits, target)``: ``target[:, 0]`` holds the class index and ``target[:, 1]`` the
    sample weight ``w_i``; the loss is ``sum_i w_i c_i l_i / sum_i w_i c_i`` with ``l_i`` the
    cross-entropy of sample ``i`` and ``c_i`` the class weight of its label (``weight``, 1
    without), so with unit weights it is :class:`torch.nn.CrossEntropyLoss`.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        label = target[:, 0].long()
        w = target[:, 1].to(input.dtype)
        loss = nn.functional.cross_entropy(
            input, label, reduction="none", label_smoothing=self.label_smoothing
        )
        if self.weight is not None:
            w = w * self.weight.to(input.dtype)[label]
        total = w.sum()
        if total <= 0:  # a batch of weight 0: no gradient (still attached to the graph)
            return (loss * w).sum()
        return (loss * w).sum() / total


def _eval_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` in eval mode; a module in train mode is switched back afterwards."""
    if not module.training:
        return module(x)
    module.eval()
    try:
        return module(x)
    finally:
        module.train(True)
