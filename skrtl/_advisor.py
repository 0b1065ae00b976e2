"""Rule-of-thumb advice on how to transfer a pretrained CNN to a small medical data set.

:func:`suggest_strategy` encodes the usual guidance for fine-tuning on small data:

* very small or noisily labelled data sets: train only a new head on frozen features
  (*linear probe*); everything else over-fits;
* medium data sets: *fine-tune* with the shallow, generic layers (edges, textures) frozen and
  smaller learning rates for lower layers (discriminative rates ``lr * gamma ** (L - l)``);
* a large domain gap (e.g. grayscale ultrasound vs. ImageNet photos): freeze *fewer* layers
  and decay learning rates less, because even mid-level features must adapt;
* very large data sets: training from *scratch* becomes an option (pretraining still rarely
  hurts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from numbers import Integral, Real

__all__ = ["StrategyAdvice", "suggest_strategy"]

_DEFAULT_N_LAYERS = 10  # tf_efficientnet_lite0 with a classifier: stem, 7 stages, head, classifier

_LEVELS = ("low", "medium", "high")


@dataclass(frozen=True)
class StrategyAdvice:
    """Suggested transfer-learning set-up (see :func:`suggest_strategy`).

    Attributes
    ----------
    strategy : {"scratch", "linear_probe", "finetune"}
    freeze_depth : int
        Number ``k`` of frozen transfer layers (layers ``1..k``).
    gamma : float
        Layer-wise learning-rate decay: layer ``l`` trains with ``lr * gamma ** (L - l)``.
    lr : float
        Learning rate of the last layer (``alpha_max``).
    reason : str
        Human-readable explanation of the choice.
    """

    strategy: str
    freeze_depth: int
    gamma: float
    lr: float
    reason: str

    def as_params(self) -> dict:
        """Parameters for :class:`~skrtl._finetune.FineTuneClassifier` (``set_params``)."""
        d = asdict(self)
        d.pop("reason")
        return d


def _level(value, name: str) -> int:
    """Map "low"/"medium"/"high" or a number in [0, 1] to 0, 1, 2."""
    if isinstance(value, str):
        if value not in _LEVELS:
            raise ValueError(
                f"{name} must be one of {_LEVELS} or a number in [0, 1], got {value!r}."
            )
        return _LEVELS.index(value)
    if isinstance(value, Real) and not isinstance(value, bool) and 0 <= value <= 1:
        if name == "label_noise":  # fraction of wrong labels
            return 0 if value < 0.05 else (1 if value < 0.15 else 2)
        return 0 if value < 1 / 3 else (1 if value < 2 / 3 else 2)
    raise ValueError(f"{name} must be one of {_LEVELS} or a number in [0, 1], got {value!r}.")


def suggest_strategy(
    n_samples: int,
    *,
    n_classes: int = 2,
    label_noise: str | float = "low",
    domain_gap: str | float = "medium",
    n_layers: int | None = None,
) -> StrategyAdvice:
    """Suggest a transfer strategy, freeze depth and learning rates for a data set.

    Parameters
    ----------
    n_samples : int
        Number of labelled training images (patients).
    n_classes : int, default=2
        Number of classes; the size thresholds scale with the samples *per class*.
    label_noise : {"low", "medium", "high"} or float in [0, 1], default="low"
        Expected label noise; a float is the fraction of wrong labels (>= 0.05 medium,
        >= 0.15 high).
    domain_gap : {"low", "medium", "high"} or float in [0, 1], default="medium"
        Distance between ImageNet photos and the target images (ImageNet-like colour photos:
        low; grayscale CT / X-ray / ultrasound: medium to high).
    n_layers : int, optional
        Number ``L`` of transfer layers of the network, classifier included (see
        :func:`skrtl.get_transfer_layers`). Default: 10 (``tf_efficientnet_lite0``).

    Returns
    -------
    StrategyAdvice
        ``strategy``, ``freeze_depth``, ``gamma``, ``lr`` and ``reason``.

    Examples
    --------
    >>> from skrtl import suggest_strategy
    >>> suggest_strategy(60).strategy
    'linear_probe'
    >>> advice = suggest_strategy(600, domain_gap="high")
    >>> advice.strategy, advice.freeze_depth
    ('finetune', 4)
    """
    if not isinstance(n_samples, Integral) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
    if not isinstance(n_classes, Integral) or isinstance(n_classes, bool) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}.")
    if n_layers is None:
        n_layers = _DEFAULT_N_LAYERS
    if not isinstance(n_layers, Integral) or isinstance(n_layers, bool) or n_layers < 2:
        raise ValueError(
            f"n_layers must be an integer >= 2 (layers incl. head), got {n_layers!r}."
        )
    noise = _level(label_noise, "label_noise")
    gap = _level(domain_gap, "domain_gap")
    L = int(n_layers)
    per_class = n_samples / n_classes
    size = f"{n_samples} samples ({per_class:.0f} per class)"

    if per_class < 50 or noise == 2:
        why = "very few samples per class" if per_class < 50 else "high label noise"
        return StrategyAdvice(
            strategy="linear_probe",
            freeze_depth=L - 1,
            gamma=1.0,
            lr=1e-3,
            reason=(
                f"{size}, {why}: train only a new classification head on frozen pretrained "
                "features (linear probe); fine-tuning the backbone would over-fit"
                + (" the noisy labels." if noise == 2 else ".")
            ),
        )
    if per_class >= 50_000 and noise == 0 and gap == 2:
        return StrategyAdvice(
            strategy="scratch",
            freeze_depth=0,
            gamma=1.0,
            lr=1e-3,
            reason=(
                f"{size} with clean labels and a large domain gap: training from scratch is "
                "possible (fine-tuning everything with gamma close to 1 is a safe alternative)."
            ),
        )
    # fine-tuning: the fraction of frozen layers shrinks with data size and domain gap
    if per_class < 500:
        frac = 0.6
    elif per_class < 5000:
        frac = 0.4
    else:
        frac = 0.2
    frac -= 0.1 * gap
    if noise == 1:
        frac += 0.1
    k = int(max(0, min(L - 2, round(frac * L))))
    gamma = {0: 0.6, 1: 0.7, 2: 0.85}[gap] if per_class < 5000 else 0.9
    depth = "no layer" if k == 0 else ("layer 1" if k == 1 else f"layers 1..{k}")
    gap_txt = ("a small", "a moderate", "a large")[gap]
    return StrategyAdvice(
        strategy="finetune",
        freeze_depth=k,
        gamma=gamma,
        lr=1e-3,
        reason=(
            f"{size}, {gap_txt} domain gap"
            + (", some label noise" if noise == 1 else "")
            + f": fine-tune with {depth} of {L} frozen (generic low-level filters) and "
            f"layer-wise learning rates decaying by gamma={gamma} per layer towards the input"
            + (
                "; a large domain gap calls for freezing fewer layers and a milder decay."
                if gap == 2
                else "."
            )
        ),
    )
