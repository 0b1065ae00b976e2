"""Search spaces of :class:`~skrtl.TransferSearchCV`: the default transfer space and
validated optuna distributions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from numbers import Integral
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from ._backbone import get_transfer_layers, load_backbone

__all__ = [
    "DEFAULT_STRATEGIES",
    "check_distributions",
    "n_layers_of",
    "suggest_from_distributions",
    "transfer_search_space",
]

DEFAULT_STRATEGIES = ("finetune", "linear_probe")


def transfer_search_space(
    n_layers: int,
    *,
    strategies: tuple[str, ...] | list[str] = DEFAULT_STRATEGIES,
    gamma: tuple[float, float] = (0.1, 1.0),
    lr: tuple[float, float] = (1e-4, 1e-2),
) -> Callable[[optuna.trial.BaseTrial], dict]:
    """Default search space of :class:`TransferSearchCV` for a network with ``n_layers`` layers.

    The space is *conditional*: the freeze depth and ``gamma`` only mean something when the
    backbone is fine-tuned, so they are sampled only for ``strategy="finetune"`` (a linear
    probe freezes everything but the classifier, a network trained from scratch freezes
    nothing), which keeps the sampler from spending trials on equivalent configurations.

    Parameters
    ----------
    n_layers : int
        Number ``L`` of transfer layers (:func:`skrtl.get_transfer_layers` of the network
        *with* its classifier). ``freeze_depth`` is drawn from ``0 .. L-1`` (``0`` = nothing
        frozen, ``L-1`` = everything but the classifier frozen).
    strategies : sequence of str, default=("finetune", "linear_probe")
        Values of the categorical ``strategy`` parameter (add ``"scratch"`` to compare with
        training from random weights). A single value fixes the strategy without sampling.
    gamma : (float, float), default=(0.1, 1.0)
        Bounds of the log-uniform layer-wise learning-rate decay.
    lr : (float, float), default=(1e-4, 1e-2)
        Bounds of the log-uniform peak learning rate ``alpha_max``.

    Returns
    -------
    callable
        ``space(trial) -> dict`` of estimator parameters, usable as ``param_distributions``.

    Examples
    --------
    >>> import optuna
    >>> space = transfer_search_space(10)
    >>> space(optuna.trial.FixedTrial({"strategy": "finetune", "freeze_depth": 3,
    ...                                "gamma": 0.5, "lr": 1e-3}))
    {'strategy': 'finetune', 'lr': 0.001, 'freeze_depth': 3, 'gamma': 0.5}
    """
    if not isinstance(n_layers, Integral) or n_layers < 1:
        raise ValueError(
            f"n_layers must be a positive integer (the number of transfer layers of the "
            f"backbone), got {n_layers!r}."
        )
    strategies = tuple(strategies)
    if not strategies:
        raise ValueError("strategies must name at least one strategy, got an empty sequence.")
    for name, bounds in (("gamma", gamma), ("lr", lr)):
        if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]:
            raise ValueError(
                f"{name} must be a pair (low, high) with 0 < low <= high, got {bounds!r}."
            )
    if not 0 < gamma[1] <= 1:
        raise ValueError(f"gamma bounds must lie in (0, 1], got {gamma!r}.")
    n_layers = int(n_layers)

    def space(trial: optuna.trial.BaseTrial) -> dict:
        if len(strategies) == 1:
            strategy = strategies[0]
        else:
            strategy = trial.suggest_categorical("strategy", list(strategies))
        params: dict[str, Any] = {"strategy": strategy}
        params["lr"] = trial.suggest_float("lr", lr[0], lr[1], log=True)
        if strategy == "finetune":
            params["freeze_depth"] = trial.suggest_int("freeze_depth", 0, max(n_layers - 1, 0))
            params["gamma"] = trial.suggest_float("gamma", gamma[0], gamma[1], log=True)
        return params

    space.n_layers = n_layers  # type: ignore[attr-defined]
    return space


def n_layers_of(estimator) -> int:
    """Number of transfer layers of an (unfitted or fitted) torch image estimator."""
    n_layers = getattr(estimator, "n_layers_", None)
    if isinstance(n_layers, Integral) and n_layers > 0:
        return int(n_layers)
    params = estimator.get_params(deep=False)
    if "backbone" not in params:
        raise ValueError(
            f"param_distributions=None builds the default transfer space from the estimator's "
            f"backbone, but {type(estimator).__name__} has no 'backbone' parameter. Pass "
            "param_distributions explicitly: a dict of optuna distributions, e.g. "
            "{'freeze_depth': optuna.distributions.IntDistribution(0, 5)}, or a callable "
            "trial -> dict."
        )
    backbone = params["backbone"]
    if isinstance(backbone, str):
        model = load_backbone(backbone, pretrained=False, num_classes=2)
    else:  # an nn.Module passed directly
        model = backbone
    return len(get_transfer_layers(model))


def suggest_from_distributions(
    trial: optuna.trial.BaseTrial, distributions: Mapping[str, Any]
) -> dict:
    params = {}
    for name, dist in distributions.items():
        if isinstance(dist, IntDistribution):
            params[name] = trial.suggest_int(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
        elif isinstance(dist, FloatDistribution):
            params[name] = trial.suggest_float(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
        elif isinstance(dist, CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, list(dist.choices))
        elif isinstance(dist, list | tuple):
            params[name] = trial.suggest_categorical(name, list(dist))
        else:  # pragma: no cover - validated in fit
            raise TypeError(name, dist)
    return params


def check_distributions(distributions: Mapping[str, Any], estimator) -> None:
    valid = estimator.get_params(deep=True)
    for name, dist in distributions.items():
        if not isinstance(name, str):
            raise TypeError(
                f"param_distributions keys must be parameter names (str), got {name!r}."
            )
        if name not in valid:
            raise ValueError(
                f"param_distributions has the key {name!r}, which is not a parameter of "
                f"{type(estimator).__name__}. Valid parameters: {sorted(valid)}."
            )
        if isinstance(dist, BaseDistribution):
            if not isinstance(dist, IntDistribution | FloatDistribution | CategoricalDistribution):
                raise TypeError(
                    f"param_distributions[{name!r}]={dist!r} is not supported: use "
                    "optuna.distributions.IntDistribution, FloatDistribution or "
                    "CategoricalDistribution."
                )
        elif isinstance(dist, list | tuple):
            if len(dist) == 0:
                raise ValueError(f"param_distributions[{name!r}] is an empty list of choices.")
        else:
            raise TypeError(
                f"param_distributions[{name!r}]={dist!r} must be an optuna distribution "
                "(IntDistribution, FloatDistribution, CategoricalDistribution) or a list of "
                "choices."
            )
