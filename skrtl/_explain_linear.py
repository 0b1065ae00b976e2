"""Class activation maps of linear probes: the probe's coefficients on the feature maps.

A linear-probe pipeline ``PretrainedCNNFeatures -> [affine steps] -> linear model`` scores an
image with ``f(x) = w . z(x) + b``, where ``z`` are the pooled feature maps. Every step between
the features and the linear model that is an affine map (``StandardScaler``, ``PCA``,
``MaxAbsScaler``, feature selection, ...) is folded into effective weights ``w`` and intercept
``b`` (found numerically and checked on the explained images, so no step is assumed affine).

The pooled features are then decomposed over the cells of each feature map, ``z_k = sum_ij
D_kij``, and the class activation map is ``CAM_ij = sum_k w_k (D_kij - r_k P_kij)``, relative
to a reference feature vector ``r`` (the features' training mean held by the first step,
``StandardScaler.mean_`` / ``PCA.mean_``; without one ``r = 0``, the CAM of Zhou et al. 2016)
placed like the channel (``P`` sums to one over the cells). Its sum over the cells is exactly
``f(x) - f(r)`` (the offset ``f(r) = w . r + b`` is what no location carries), whatever the
pooling:

* ``"avg"``: ``D_kij = a_ij A_kij`` and ``P_kij = a_ij``, with ``a`` the pooling weights (``1 /
  (h w)``, or each cell's mask fraction normalised to one with masked pooling): the
  contribution of each location, ``sum_k w_k a_ij (A_kij - r_k)``;
* ``"max"``: the whole of ``z_k - r_k`` sits at the cell where channel ``k`` peaks (inside the
  mask): the map says where each channel's maximum lies, not how the score changes elsewhere;
* ``"gem"``: ``z_k`` (and ``r_k``) are shared out in proportion to ``a_ij A_kij ** p`` (``p =
  1`` is the average, large ``p`` tends to max);
* ``"avgmax"``: the sum of the average and the max maps, each with its half of ``w``;
* several layers: one map per layer (on its own grid), added on the image grid;
* 3-D slice-wise features averaged over slices (``aggregate="mean"``): each slice's map is
  divided by the number of slices; ``aggregate="max"`` puts each channel on the slice where it
  peaks.

The feature values are those ``transform`` returns (float32); the decomposition is computed
from the same inference copy of the network and takes up the last rounding difference, so the
maps add up to the pipeline's decision function in float64 arithmetic.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ._inference import InferenceRunner

__all__ = [
    "FeatureDecomposition",
    "LinearHead",
    "class_activation_maps",
    "decompose_features",
    "linear_head",
]


# --------------------------------------------------------------------------------------------
# the linear head: affine steps folded into the linear model
# --------------------------------------------------------------------------------------------
def _named_input(step, M):
    names = getattr(step, "feature_names_in_", None)
    if names is not None and not isinstance(M, pd.DataFrame) and len(names) == M.shape[1]:
        return pd.DataFrame(M, columns=list(names))
    return M


def _apply(step, M) -> np.ndarray:
    return np.asarray(step.transform(_named_input(step, M)), dtype=np.float64)


def _affine_probe(step, Z: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A, c, step(Z))`` with ``step(z) = z @ A + c``, checked on the real inputs ``Z``."""
    p = Z.shape[1]
    basis = np.vstack([np.zeros((1, p)), np.eye(p)])
    out = _apply(step, basis)
    c = out[0]
    A = out[1:] - c
    real = _apply(step, Z)
    scale = 1.0 + float(np.abs(real).max(initial=0.0))
    if real.shape != (Z.shape[0], A.shape[1]) or not np.allclose(
        Z @ A + c, real, rtol=1e-5, atol=1e-6 * scale
    ):
        raise ValueError(
            f"Pipeline step {name!r} ({type(step).__name__}) is not an affine map of its input, "
            "so the probe's class activation map is not defined through it. Steps between "
            "PretrainedCNNFeatures and the linear model must be affine (StandardScaler, PCA, "
            "MaxAbsScaler, feature selection, ...); explain a pipeline without that step."
        )
    return A, c, real


def _final_decision(final, M) -> np.ndarray:
    M = _named_input(final, M)
    if hasattr(final, "decision_function"):
        out = np.asarray(final.decision_function(M), dtype=np.float64)
    else:
        out = np.asarray(final.predict(M), dtype=np.float64)
    return out.reshape(len(out), -1)


@dataclass
class LinearHead:
    """The linear part of a probe pipeline on the CNN features: ``z @ weights + intercept``.

    Attributes
    ----------
    weights : ndarray of shape (n_features, n_outputs)
    intercept : ndarray of shape (n_outputs,)
    classes : ndarray or None
        Class labels of a classifier (``None`` for a regressor).
    steps : list of (str, estimator)
        The affine steps between the features and the linear model.
    final : estimator
        The linear model.
    reference : ndarray of shape (n_features,)
        The reference feature vector of the maps (the first step's ``mean_``, else zeros).
    """

    weights: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray | None
    steps: list = field(default_factory=list)
    final: object = None
    reference: np.ndarray | None = None

    def decision(self, Z: np.ndarray) -> np.ndarray:
        """Decision function (``predict`` of a regressor) through the real steps."""
        M = np.asarray(Z, dtype=np.float64)
        for _, step in self.steps:
            M = _apply(step, M)
        return _final_decision(self.final, M)

    def column(self, label) -> tuple[int, float]:
        """``(output column, sign)`` of the score of class ``label``."""
        if self.classes is None:
            if label is not None:
                raise ValueError(
                    f"target={label!r}: the final step {type(self.final).__name__} is a "
                    "regressor; its prediction is explained, leave target=None."
                )
            return 0, 1.0
        classes = list(self.classes)
        if label not in classes:
            raise ValueError(
                f"target={label!r} is not a class of the probe; classes: {classes!r}."
            )
        k = classes.index(label)
        if len(classes) == 2 and self.weights.shape[1] == 1:
            return 0, (1.0 if k == 1 else -1.0)
        return k, 1.0

    def predicted(self, decision: np.ndarray) -> np.ndarray:
        """Predicted labels (classifier) from the decision values."""
        if self.classes is None:
            return np.full(len(decision), None, dtype=object)
        if decision.shape[1] == 1:
            return self.classes[(decision[:, 0] > 0).astype(int)]
        return self.classes[decision.argmax(axis=1)]


def linear_head(steps, final, Z: np.ndarray) -> LinearHead:
    """Fold the affine ``steps`` and the linear ``final`` model into one linear map.

    Parameters
    ----------
    steps : list of (str, estimator)
        Fitted transformers between the CNN features and the linear model (``None`` /
        ``"passthrough"`` entries are skipped).
    final : estimator
        A fitted linear model (``coef_`` and ``intercept_``).
    Z : ndarray of shape (n, n_features)
        Real CNN features, on which every step and the model are checked.
    """
    steps = [(n, s) for n, s in steps if s is not None and not (isinstance(s, str))]
    coef = getattr(final, "coef_", None)
    if coef is None:
        raise ValueError(
            f"the final step {type(final).__name__} has no coef_: a class activation map needs "
            "a linear model (LogisticRegression, LinearSVC, RidgeClassifier, SGDClassifier, "
            "Ridge, ...). Explain a FineTuneClassifier with method='gradcam' instead."
        )
    if hasattr(coef, "toarray"):
        coef = coef.toarray()
    coef = np.atleast_2d(np.asarray(coef, dtype=np.float64))
    intercept = np.broadcast_to(
        np.asarray(getattr(final, "intercept_", 0.0), dtype=np.float64).ravel(), (coef.shape[0],)
    ).copy()
    Z = np.asarray(Z, dtype=np.float64)
    A_total = np.eye(Z.shape[1])
    c_total = np.zeros(Z.shape[1])
    M = Z
    for name, step in steps:
        A, c, M = _affine_probe(step, M, name)
        c_total = c_total @ A + c
        A_total = A_total @ A
    weights = A_total @ coef.T
    bias = c_total @ coef.T + intercept
    real = _final_decision(final, M)
    lin = Z @ weights + bias
    scale = 1.0 + float(np.abs(real).max(initial=0.0))
    if real.shape != lin.shape or not np.allclose(lin, real, rtol=1e-5, atol=1e-6 * scale):
        raise ValueError(
            f"the final step {type(final).__name__}'s decision function is not X @ coef_.T + "
            "intercept_ (a kernel or one-vs-one model?), so its class activation map is not "
            "defined. Use a linear model such as LogisticRegression."
        )
    classes = getattr(final, "classes_", None)
    reference = np.zeros(Z.shape[1])
    if steps:
        mean = getattr(steps[0][1], "mean_", None)
        if mean is not None and np.shape(mean) == (Z.shape[1],):
            reference = np.asarray(mean, dtype=np.float64)
    noise = float(np.mean(np.abs(Z) @ np.abs(weights))) * 2.0**-23  # float32 rounding of z
    if noise > 1e-2 * (1.0 + float(np.abs(real).mean())):
        warnings.warn(
            "the probe's decision function depends on the float32 rounding of its features "
            f"(about {noise:.3g} in decision units): a StandardScaler divides near-constant "
            "features by a near-zero standard deviation. Its predictions and class activation "
            "maps carry that noise; drop constant features (sklearn VarianceThreshold) before "
            "the scaler.",
            UserWarning,
            stacklevel=3,
        )
    return LinearHead(
        weights=weights,
        intercept=bias,
        classes=None if classes is None else np.asarray(classes),
        steps=steps,
        final=final,
        reference=reference,
    )


# --------------------------------------------------------------------------------------------
# pooled features decomposed over the feature-map cells
# --------------------------------------------------------------------------------------------
@dataclass
class FeatureDecomposition:
    """Pooled CNN features of network images, decomposed over the cells of the feature maps.

    Attributes
    ----------
    z : ndarray of shape (n_images, n_features)
        Pooled features of every network image.
    parts : list of list of ndarray
        ``parts[j][b]``: array ``(n_block_features, gh, gw)`` of feature block ``b`` of image
        ``j``, whose sum over the cells is ``z[j, blocks[b][2]]``.
    placements : list of list of ndarray
        Same shapes: where a constant (the reference, a rounding difference) of each channel
        goes; sums to one over the cells (the pooling weights, the peak cell, the GeM shares).
    blocks : list of (str, str, slice)
        ``(layer tag, pooling, feature columns)`` of every block, in feature order.
    owners : ndarray of int of shape (n_images,)
        Sample (row of the input) of every network image.
    """

    z: np.ndarray
    parts: list
    placements: list
    blocks: list
    owners: np.ndarray

    def subset(self, images) -> FeatureDecomposition:
        """The decomposition of some network images only."""
        images = np.asarray(images, dtype=int)
        return FeatureDecomposition(
            z=self.z[images],
            parts=[self.parts[j] for j in images],
            placements=[self.placements[j] for j in images],
            blocks=self.blocks,
            owners=self.owners[images],
        )


def _decompose(fmap: torch.Tensor, w: torch.Tensor | None, pool: str, p: float):
    """``(z, D, P)`` of one pooling of a map: ``D.sum((2, 3)) == z``, ``P.sum((2, 3)) == 1``."""
    n, k, gh, gw = fmap.shape
    if w is None:
        a = torch.full((n, 1, gh, gw), 1.0 / (gh * gw), dtype=fmap.dtype)
        allowed = torch.ones((n, 1, gh, gw), dtype=torch.bool)
    else:
        a = w / w.sum(dim=(2, 3), keepdim=True)
        allowed = w > 0
    if pool == "avg":
        D = a * fmap
        return D.sum(dim=(2, 3)), D, a.expand_as(fmap)
    if pool == "max":
        flat = fmap.masked_fill(~allowed, float("-inf")).reshape(n, k, -1)
        z, idx = flat.max(dim=2)
        P = torch.zeros_like(flat).scatter_(2, idx[..., None], 1.0).reshape(n, k, gh, gw)
        return z, P * z[..., None, None], P
    f = fmap.clamp_min(1e-6).pow(p) * a  # gem
    s = f.sum(dim=(2, 3))
    z = s.pow(1.0 / p)
    P = f / s[..., None, None]
    return z, P * z[..., None, None], P


def decompose_features(cnn, data, rows, *, batch_size: int) -> FeatureDecomposition:
    """Pooled features of the network images of ``rows``, decomposed over the cells.

    The feature maps come from the same inference copy of the network that ``transform``
    uses (:class:`~skrtl._inference.InferenceRunner` at the estimator's precision), from
    the estimator's own preprocessing (``preprocessor_.iter_batches``) and masks.
    """
    runner = InferenceRunner(
        cnn.model_,
        layer_modules=list(cnn.layer_modules_),
        in_chans=cnn.in_chans_,
        size=tuple(cnn.input_size_),
        device=cnn.device_,
        precision=cnn.precision_,
        compiled=False,
    )
    pools = ["avg", "max"] if cnn.pooling == "avgmax" else [cnn.pooling]
    blocks, start = [], 0
    for tag, dim in zip(cnn.layers_, cnn.layer_dims_):
        for pool in pools:
            blocks.append((tag, pool, slice(start, start + int(dim))))
            start += int(dim)
    zs, parts, places, owners = [], [], [], []
    for x, m, own in cnn.preprocessor_.iter_batches(data, rows, batch_size):
        maps = runner(x)
        use_mask = cnn.mask_pooling and m is not None
        z_b = []
        parts_b = [[] for _ in range(len(x))]
        places_b = [[] for _ in range(len(x))]
        for fmap in maps:
            fmap = fmap.detach().cpu().double()
            w = None
            if use_mask:
                w = F.adaptive_avg_pool2d(m.double(), fmap.shape[2:])
            for pool in pools:
                z, D, P = _decompose(fmap, w, pool, float(cnn.gem_p))
                z_b.append(z)
                for j in range(len(x)):
                    parts_b[j].append(D[j].numpy())
                    places_b[j].append(np.ascontiguousarray(P[j].numpy()))
        zs.append(torch.cat(z_b, dim=1).numpy())
        parts.extend(parts_b)
        places.extend(places_b)
        owners.append(own)
    return FeatureDecomposition(
        z=np.concatenate(zs),
        parts=parts,
        placements=places,
        blocks=blocks,
        owners=np.concatenate(owners),
    )


def class_activation_maps(
    dec: FeatureDecomposition,
    v: np.ndarray,
    *,
    aggregate: str = "mean",
    reference: np.ndarray | None = None,
    features: np.ndarray | None = None,
) -> tuple[np.ndarray, list[list[tuple[str, np.ndarray]]], dict]:
    """Sample features and the class activation maps of weights ``v`` on every network image.

    Parameters
    ----------
    dec : FeatureDecomposition
    v : ndarray of shape (n_features,)
        Effective weights of the explained score on the CNN features.
    aggregate : {"mean", "max"}
        How the network images of one sample (slices of a volume) are combined into its
        features.
    reference : ndarray of shape (n_features,), optional
        Reference feature vector ``r``: the maps add up to ``v . (z - r)`` (default 0).
    features : ndarray of shape (n_samples, n_features), optional
        The features ``transform`` returned for the samples (in order of first appearance in
        ``dec.owners``): the decomposition takes up their difference to its own sums (float32
        rounding), so that the maps add up to ``v . (features - r)``.

    Returns
    -------
    z : ndarray of shape (n_samples, n_features)
        The features of each sample (``features`` when given).
    maps : list of list of (str, ndarray)
        Per network image, ``(layer tag, cell map (gh, gw))`` of every layer.
    sample_of : dict
        Owner (sample row) -> position in ``z``.
    """
    owners = dec.owners
    order = list(dict.fromkeys(owners.tolist()))
    sample_of = {o: i for i, o in enumerate(order)}
    p = dec.z.shape[1]
    z = np.zeros((len(order), p))
    weight = np.zeros((len(owners), p))  # share of image j in each feature of its sample
    for o in order:
        js = np.flatnonzero(owners == o)
        zj = dec.z[js]
        if aggregate == "max":
            pick = zj.argmax(axis=0)
            z[sample_of[o]] = zj[pick, np.arange(p)]
            for r, j in enumerate(js):
                weight[j] = (pick == r).astype(float)
        else:
            z[sample_of[o]] = zj.mean(axis=0)
            weight[js] = 1.0 / len(js)
    # constant per channel placed like the channel: rounding difference minus the reference
    const = np.zeros_like(z) if features is None else np.asarray(features, np.float64) - z
    if reference is not None:
        const = const - np.asarray(reference, dtype=np.float64)[None, :]
    maps = []
    for j in range(len(owners)):
        s = sample_of[owners[j]]
        per_layer: dict[str, np.ndarray] = {}
        for (tag, _, cols), D, P in zip(dec.blocks, dec.parts[j], dec.placements[j]):
            coeff = v[cols] * weight[j, cols]
            cam = np.tensordot(coeff, D, axes=(0, 0))
            cam = cam + np.tensordot(coeff * const[s, cols], P, axes=(0, 0))
            per_layer[tag] = per_layer.get(tag, 0.0) + cam
        maps.append(list(per_layer.items()))
    if features is not None:
        z = np.asarray(features, dtype=np.float64)
    return z, maps, sample_of
