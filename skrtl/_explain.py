"""Saliency maps of skrtl's CNN estimators: where the network looked, on the original images.

:func:`explain` takes a fitted estimator and images and returns :class:`SaliencyMaps`:

* a :class:`~skrtl.FineTuneClassifier` (alone, inside a Pipeline, or wrapped in
  :class:`~skrtl.AdaBN`) is explained by Grad-CAM, Grad-CAM++ or Score-CAM on a transfer
  layer (pytorch-grad-cam), or by occlusion (captum), averaged over the members of an ensemble
  and, with ``tta=True``, over the image and its mirror image -- what ``predict_proba``
  averages;
* a linear-probe Pipeline (:class:`~skrtl.PretrainedCNNFeatures`, affine steps such as
  ``StandardScaler``, a linear model) by its class activation map: the probe's coefficients on
  the feature maps, which add up exactly to the decision function (:mod:`skrtl._explain_linear`).

Images go through the estimator's own preprocessing (``preprocessor_``: the network inputs are
identical to those of ``predict``), earlier Pipeline steps (histogram matching, lesion crops)
are applied first, and with AdaBN every row is explained with the copy of the network holding
its site's statistics. The maps are mapped back from the network input to the grid of the
images the CNN step receives (:mod:`skrtl._explain_views`), plane by plane for volumes.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np
import pandas as pd
import torch

from ._adabn import AdaBN
from ._explain_linear import (
    class_activation_maps,
    decompose_features,
    linear_head,
)
from ._explain_network import (
    NETWORK_METHODS,
    network_saliency,
    resolve_saliency_layer,
    timm_model_of,
)
from ._explain_views import (
    SaliencyView,
    assemble_map,
    network_planes,
    plane_of,
    plane_shape,
    resize_map,
    spatial_shape,
)
from ._features import PretrainedCNNFeatures
from ._finetune import FineTuneClassifier
from ._imaging import read_image_frame
from ._transfer import EnsembleModule

__all__ = ["METHODS", "SaliencyMaps", "explain"]

#: Saliency methods of :func:`explain`.
METHODS = ("auto", *NETWORK_METHODS, "cam")

_UNITS = {
    "gradcam": "Grad-CAM, scaled to [0, 1] per network image",
    "gradcam++": "Grad-CAM++, scaled to [0, 1] per network image",
    "scorecam": "Score-CAM, scaled to [0, 1] per network image",
    "occlusion": "drop of the target logit when the region is occluded",
    "cam": "contribution to the decision function per pixel",
}


class SaliencyMaps:
    """Saliency maps of a set of images, on the images' own grids (result of :func:`explain`).

    Attributes
    ----------
    method : str
        ``"gradcam"``, ``"gradcam++"``, ``"scorecam"``, ``"occlusion"`` or ``"cam"``.
    layer : str or list of str
        The explained layer (transfer-layer or module name), or the feature layers of a probe.
    mode : str
        The estimator's ``mode`` (``"2d"``, ``"2.5d"``, ``"3d"``).
    views : list of list of SaliencyView
        Per sample, the planes its network images show (one for a 2-D image, three orthogonal
        planes for 2.5-D, one per slice for 3-D slice-wise), each with the plane of the image,
        of its mask and of the saliency map.
    targets : ndarray
        The class whose evidence is mapped, per sample (``None`` for a regressor).
    predictions : ndarray
        The estimator's predicted class per sample.
    scores : ndarray of float
        The explained score per sample: the target's probability (networks) or decision
        function (probes; ``-decision_function`` for the first of two classes).
    offsets : ndarray of float or None
        Class activation maps: the part of the score no pixel carries (the intercept, and the
        layers left out by ``layer``): ``total() + offsets == scores``.
    sites : ndarray or None
        With AdaBN: the domain whose statistics explained each row.
    index : list
        Row labels of the explained images.
    signed : bool
        Whether the maps can be negative (evidence against the target).
    units : str
        What a map value means.
    shapes : list of tuple
        Spatial shape of each sample image.
    spacing : list of tuple or None
        Pixel / voxel spacing of each sample (from the image frame), for the display aspect.
    """

    def __init__(
        self,
        *,
        method,
        layer,
        mode,
        views,
        targets,
        predictions,
        scores,
        offsets=None,
        sites=None,
        index=None,
        shapes=None,
        spacing=None,
    ):
        self.method = method
        self.layer = layer
        self.mode = mode
        self.views = views
        self.targets = np.asarray(targets, dtype=object)
        self.predictions = np.asarray(predictions, dtype=object)
        self.scores = np.asarray(scores, dtype=float)
        self.offsets = None if offsets is None else np.asarray(offsets, dtype=float)
        self.sites = None if sites is None else np.asarray(sites, dtype=object)
        self.index = list(range(len(views))) if index is None else list(index)
        self.signed = method in ("cam", "occlusion")
        self.units = _UNITS[method]
        self.shapes = list(shapes) if shapes is not None else []
        self.spacing = None if spacing is None else [tuple(map(float, sp)) for sp in spacing]

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> list[SaliencyView]:
        return self.views[i]

    def __repr__(self) -> str:
        return (
            f"SaliencyMaps(method={self.method!r}, layer={self.layer!r}, mode={self.mode!r}, "
            f"n_samples={len(self)})"
        )

    @property
    def maps(self) -> list[np.ndarray]:
        """Each sample's map on its own grid: ``(H, W)``, or ``(D, H, W)`` with NaN off-plane."""
        return [assemble_map(shape, views) for shape, views in zip(self.shapes, self.views)]

    def total(self) -> np.ndarray:
        """Sum of each sample's map over all its planes."""
        return np.array([sum(float(v.saliency.sum()) for v in views) for views in self.views])

    def mask_share(self, *, part: str = "positive") -> np.ndarray:
        """Share of each sample's saliency inside its mask (NaN without a mask).

        Parameters
        ----------
        part : {"positive", "absolute"}
            ``"positive"``: the evidence for the target (negative values count as 0);
            ``"absolute"``: the magnitude of the map.

        Returns
        -------
        ndarray of float of shape (n_samples,)
            ``sum(saliency inside the mask) / sum(saliency)`` over the sample's planes; compare
            with :meth:`mask_fraction`, the share a map spread evenly would have.
        """
        if part not in ("positive", "absolute"):
            raise ValueError(f"part must be 'positive' or 'absolute', got {part!r}.")
        out = np.full(len(self), np.nan)
        for i, views in enumerate(self.views):
            if any(v.mask is None for v in views):
                continue
            inside = total = 0.0
            for v in views:
                s = np.abs(v.saliency) if part == "absolute" else np.clip(v.saliency, 0, None)
                inside += float(s[v.mask].sum())
                total += float(s.sum())
            out[i] = inside / total if total > 0 else np.nan
        return out

    def mask_fraction(self) -> np.ndarray:
        """Share of each sample's (explained) pixels inside its mask (NaN without a mask)."""
        out = np.full(len(self), np.nan)
        for i, views in enumerate(self.views):
            if any(v.mask is None for v in views):
                continue
            out[i] = sum(int(v.mask.sum()) for v in views) / sum(v.mask.size for v in views)
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per sample: site, target, prediction, score, mask share and mask fraction."""
        frame = pd.DataFrame(
            {
                "target": self.targets,
                "prediction": self.predictions,
                "score": self.scores,
                "mask_share": self.mask_share(),
                "mask_fraction": self.mask_fraction(),
            },
            index=pd.Index(self.index),
        )
        if self.sites is not None:
            frame.insert(0, "site", self.sites)
        return frame

    def plot(self, samples=None, **kwargs):
        """Plot the maps over the images (:meth:`SaliencyDisplay.from_maps`)."""
        from ._explain_display import SaliencyDisplay

        return SaliencyDisplay.from_maps(self, samples=samples, **kwargs)


# --------------------------------------------------------------------------------------------
# what is explained
# --------------------------------------------------------------------------------------------
def _unfrozen(est):
    from sklearn.frozen import FrozenEstimator

    return est.estimator if isinstance(est, FrozenEstimator) else est


def _cnn_kind(step):
    """``"network"`` / ``"features"`` for a CNN step (possibly inside AdaBN), else None."""
    step = _unfrozen(step)
    if isinstance(step, AdaBN):
        step = getattr(step, "estimator_", step.estimator)
    if isinstance(step, FineTuneClassifier):
        return "network"
    if isinstance(step, PretrainedCNNFeatures):
        return "features"
    return None


def _rows(X, rows):
    if isinstance(X, pd.DataFrame):
        return X.iloc[rows]
    return np.asarray(X)[rows]


def _split(estimator, X):
    """``(kind, cnn step, X for the cnn step, tail steps, final step)``."""
    from sklearn.pipeline import Pipeline

    est = _unfrozen(estimator)
    if isinstance(est, Pipeline):
        steps = [(n, _unfrozen(s)) for n, s in est.steps]
        k = next((i for i, (_, s) in enumerate(steps) if _cnn_kind(s) is not None), None)
        if k is None:
            raise TypeError(
                "explain needs a Pipeline with a skrtl CNN step (PretrainedCNNFeatures or "
                f"FineTuneClassifier, possibly inside AdaBN); got steps "
                f"{[type(s).__name__ for _, s in steps]!r}."
            )
        Xc = est[:k].transform(X) if k else X
        kind = _cnn_kind(steps[k][1])
        if kind == "network":
            if k != len(steps) - 1:
                raise TypeError(
                    f"the FineTuneClassifier step {steps[k][0]!r} is not the last Pipeline step; "
                    "explain a Pipeline whose classifier is the network."
                )
            return "network", steps[k][1], Xc, [], None
        if k == len(steps) - 1:
            raise TypeError(
                "the Pipeline ends with PretrainedCNNFeatures: a feature extractor has no "
                "prediction to explain. Add the linear model that uses the features."
            )
        return "features", steps[k][1], Xc, steps[k + 1 : -1], steps[-1][1]
    kind = _cnn_kind(est)
    if kind == "network":
        return "network", est, X, [], None
    if kind == "features":
        raise TypeError(
            "PretrainedCNNFeatures alone has no prediction to explain; pass the fitted "
            "Pipeline(PretrainedCNNFeatures(), [StandardScaler(),] LogisticRegression()) whose "
            "linear probe uses the features."
        )
    raise TypeError(
        f"explain needs a fitted FineTuneClassifier, a linear-probe Pipeline on "
        f"PretrainedCNNFeatures, or either wrapped in AdaBN; got {type(estimator).__name__}."
    )


def _groups(step, X, sample_domain):
    """``[(site key or None, fitted estimator, rows)]``: AdaBN's site copies, or the step."""
    if isinstance(step, AdaBN):
        return list(step.site_estimators(X, sample_domain=sample_domain))
    if sample_domain is not None:
        raise ValueError(
            "sample_domain is only used with an AdaBN estimator (it picks each row's site "
            "statistics); drop it."
        )
    n = len(X) if hasattr(X, "__len__") else np.asarray(X).shape[0]
    return [(None, step, np.arange(n))]


def _target_labels(target, n: int) -> list | None:
    """Per-sample target labels (``None`` entries: the predicted class)."""
    if target is None:
        return None
    if isinstance(target, str) or np.ndim(target) == 0:
        return [target] * n
    labels = list(np.asarray(target, dtype=object))
    if len(labels) != n:
        raise ValueError(f"target has {len(labels)} entries but X has {n} rows; give one per row.")
    return labels


def _class_index(classes, label) -> int:
    classes = list(classes)
    for k, c in enumerate(classes):
        if c == label or (isinstance(label, str) and str(c) == label):
            return k
    raise ValueError(f"target={label!r} is not a class of the estimator; classes: {classes!r}.")


def _check_batch_size(batch_size) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}.")
    return int(batch_size)


# --------------------------------------------------------------------------------------------
# the two paths
# --------------------------------------------------------------------------------------------
def _network_inputs(est, data, rows, batch_size):
    xs, owners = [], []
    for x, _, own in est.preprocessor_.iter_batches(data, rows, batch_size):
        xs.append(x)
        owners.append(own)
    return torch.cat(xs), np.concatenate(owners)


def _explain_network(est, Xg, data, rows, *, method, layer, labels, tta, batch_size, options):
    """Per network image ``[map (h, w)]``, with targets, predictions and scores of ``rows``."""
    proba = est.predict_proba(_rows(Xg, rows) if len(rows) != len(data) else Xg)
    pred_idx = proba.argmax(axis=1)
    t_idx = pred_idx.copy()
    if labels is not None:
        for pos, row in enumerate(rows):
            if labels[row] is not None:
                t_idx[pos] = _class_index(est.classes_, labels[row])
    module = est._skrtl_torch_module()
    members = list(module.members) if isinstance(module, EnsembleModule) else [module]
    bs = batch_size or int(est.batch_size_predict or 2 * est.batch_size)
    x, owners = _network_inputs(est, data, rows, bs)
    resolved = None
    if method != "occlusion":
        probe = x[:1].to(next(members[0].parameters()).device)
        resolved = resolve_saliency_layer(timm_model_of(members[0]), layer, probe)
    elif layer is not None:
        raise ValueError("method='occlusion' occludes the input image and takes no layer.")
    pos = {int(r): i for i, r in enumerate(rows)}
    per_image_target = t_idx[[pos[int(o)] for o in owners]]
    maps = network_saliency(
        members,
        x,
        per_image_target,
        method=method,
        module_name=None if resolved is None else resolved[1],
        tta=bool(est.tta if tta is None else tta),
        batch_size=bs,
        window=options.get("occlusion_window"),
        stride=options.get("occlusion_stride"),
        verbose=options.get("verbose", 0),
    )
    classes = np.asarray(est.classes_, dtype=object)
    return {
        "owners": owners,
        "maps": [[m] for m in maps],
        "preserve_sum": False,
        "targets": classes[t_idx],
        "predictions": classes[pred_idx],
        "scores": proba[np.arange(len(rows)), t_idx],
        "offsets": None,
        "layer": "input" if resolved is None else resolved[0],
    }


def _explain_probe(cnn, data, rows, Z, *, head, labels, layer, batch_size):
    """Class activation maps of the probe for ``rows`` (see :mod:`skrtl._explain_linear`).

    ``Z`` are the features ``transform`` gives for ``rows``: the scores are the pipeline's own
    decision function on them, and the offsets the intercept (plus the layers left out), so
    that ``maps + offsets == scores`` is a checkable statement, not a definition.
    """
    if getattr(cnn, "passthrough_", []):
        raise ValueError(
            f"PretrainedCNNFeatures(passthrough={cnn.passthrough!r}) appends frame columns to "
            "the features; the class activation map covers image features only. Explain a "
            "pipeline without passthrough columns."
        )
    bs = batch_size or int(cnn.batch_size)
    dec = decompose_features(cnn, data, rows, batch_size=bs)
    decision = head.decision(Z)  # through the real steps and the real model
    predicted = head.predicted(decision)
    keep = _probe_layers(cnn, layer)
    image_maps: list = [None] * len(dec.owners)
    targets, scores, offsets = [], [], []
    for i, r in enumerate(rows):
        label = None
        if head.classes is not None:
            label = predicted[i] if labels is None or labels[r] is None else labels[r]
        col, sign = head.column(label)
        v = sign * head.weights[:, col]
        js = np.flatnonzero(dec.owners == r)
        _, maps, _ = class_activation_maps(
            dec.subset(js), v, aggregate=_agg(cnn), reference=head.reference, features=Z[[i]]
        )
        left_out = 0.0
        for j, per_layer in zip(js, maps):
            image_maps[j] = [cells for tag, cells in per_layer if keep is None or tag in keep]
            if keep is not None:
                left_out += sum(float(c.sum()) for tag, c in per_layer if tag not in keep)
        targets.append(label)
        scores.append(sign * decision[i, col])
        offsets.append(sign * head.intercept[col] + float(v @ head.reference) + left_out)
    return {
        "owners": dec.owners,
        "maps": image_maps,
        "preserve_sum": True,
        "targets": np.asarray(targets, dtype=object),
        "predictions": np.asarray(predicted, dtype=object),
        "scores": np.asarray(scores),
        "offsets": np.asarray(offsets),
        "layer": list(keep) if keep is not None else list(cnn.layers_),
    }


def _agg(cnn) -> str:
    return cnn.aggregate if cnn.mode == "3d" else "mean"


def _probe_layers(cnn, layer) -> list[str] | None:
    if layer is None:
        return None
    entries = list(layer) if isinstance(layer, list | tuple) else [layer]
    tags = []
    for e in entries:
        tag = f"l{int(e)}" if isinstance(e, Integral) and not isinstance(e, bool) else str(e)
        if tag not in cnn.layers_:
            raise ValueError(
                f"layer={layer!r}: {e!r} is not one of the feature layers of the probe "
                f"({list(cnn.layers_)!r}; PretrainedCNNFeatures(layers=...) chooses them)."
            )
        tags.append(tag)
    return tags


# --------------------------------------------------------------------------------------------
def explain(
    estimator,
    X,
    *,
    method: str = "auto",
    layer=None,
    target=None,
    tta: bool | None = None,
    sample_domain=None,
    batch_size: int | None = None,
    occlusion_window: int | None = None,
    occlusion_stride: int | None = None,
    verbose: int = 0,
) -> SaliencyMaps:
    """Saliency maps of a fitted CNN estimator on images ``X``, in the images' own grids.

    Parameters
    ----------
    estimator : estimator
        Fitted: a :class:`~skrtl.FineTuneClassifier`; a linear-probe Pipeline
        (:class:`~skrtl.PretrainedCNNFeatures`, affine steps such as ``StandardScaler`` or
        ``PCA``, a linear model with ``coef_``); either wrapped in :class:`~skrtl.AdaBN`
        (inside the Pipeline for the probe); a Pipeline with image steps before the CNN step
        (``HistogramMatcher``, ``LesionCropper``, ...), which are applied first; or a
        ``FrozenEstimator`` of any of these.
    X : ndarray or image frame
        The images to explain (a handful: every image costs a few forward and backward
        passes per ensemble member, Score-CAM one forward pass per channel).
    method : {"auto", "gradcam", "gradcam++", "scorecam", "occlusion", "cam"}, default="auto"
        Networks: ``"gradcam"`` (the default), ``"gradcam++"`` (its maps can follow the
        layer's activations more than the model's evidence and fail the model-randomisation
        check: verify with :func:`skrtl.randomization_test`), ``"scorecam"`` (gradient-free
        class activation map; costs one forward pass per channel of the layer), or
        ``"occlusion"`` (gradient-free: the drop of the target logit when a patch is
        replaced by the mean intensity). Linear probes: ``"cam"`` (the default).
    layer : None, int, str or list, default=None
        Networks: the layer of the CAM methods: ``None`` for the last convolutional stage, a
        transfer-layer index or name (:func:`skrtl.get_transfer_layers`) or a module name.
        Probes: the feature layers to map (tags of ``layers_``, e.g. ``"l9"``, or indices;
        default all, added up).
    target : None, class label or array-like of labels, default=None
        The class whose evidence is mapped: ``None`` the predicted class of each sample, one
        label for every sample, or one label per sample.
    tta : bool or None, default=None
        Networks: also explain the mirror image (and mirror its map back), averaging both as
        ``predict_proba`` averages the two predictions. ``None``: the estimator's ``tta``.
    sample_domain : array-like of shape (n_samples,), optional
        AdaBN: the site of each row instead of the frame's site column.
    batch_size : int, optional
        Network images per pass (default: the estimator's prediction batch size).
    occlusion_window, occlusion_stride : int, optional
        Occlusion patch side and step in network-input pixels (default: a sixth of the input
        side and half of it).
    verbose : int, default=0
        ``> 0``: the libraries' progress bars.

    Returns
    -------
    SaliencyMaps

    Notes
    -----
    **Ensembles and TTA.** The maps of the members of an ensemble (``n_estimators > 1``) are
    averaged, and with ``tta`` the map of the mirror image is mirrored back and averaged in:
    the map belongs to the averaged prediction ``predict_proba`` returns. The target class is
    the ensemble's prediction.

    **Grad-CAM scale.** pytorch-grad-cam scales every map to [0, 1] per network image, so the
    maps of the slices of a 3-D volume (slice-wise) are each scaled on their own; occlusion
    and class activation maps keep their units (logit drop, decision function per pixel).

    **Linear probes.** The class activation map sums exactly to ``decision_function(x) -
    intercept`` (``SaliencyMaps.total() + offsets == scores``) for every pooling; it is the
    contribution of each location for average pooling, see :mod:`skrtl._explain_linear` for
    what it means for max, GeM and avgmax pooling, several layers and 3-D aggregation.

    **Geometry.** Maps are computed on the network input and mapped back to the grid of the
    images the CNN step receives (the resize undone; maps of probes with their sum kept). A
    2.5-D network image is three orthogonal planes stacked as channels: its map is shown on
    each of the three planes (an additive map is shared between them in proportion to their
    pixels, the same density on each); adjacent slices give one axial view (the centre
    slice); 3-D slice-wise mode one view per slice.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS!r}, got {method!r}.")
    if tta is not None and not isinstance(tta, bool | np.bool_):
        raise ValueError(f"tta must be True, False or None (the estimator's own), got {tta!r}.")
    batch_size = _check_batch_size(batch_size)
    kind, step, Xc, tail, final = _split(estimator, X)
    if method == "auto":
        method = "gradcam" if kind == "network" else "cam"
    if kind == "network" and method == "cam":
        raise ValueError(
            "method='cam' is the class activation map of a linear probe on PretrainedCNNFeatures; "
            f"a FineTuneClassifier is explained by one of {NETWORK_METHODS!r}."
        )
    if kind == "features" and method != "cam":
        raise ValueError(
            f"method={method!r} explains a FineTuneClassifier; a linear-probe pipeline is "
            "explained by its class activation map, method='cam' (or 'auto')."
        )
    groups = _groups(step, Xc, sample_domain)
    first = groups[0][1]
    if getattr(first, "_volumetric", False):
        raise ValueError(
            f"explain: saliency maps are 2-D; {type(first).__name__}(mode='3d', volumetric="
            f"{first.volumetric!r}) runs a 3-D network. Explain a slice-wise model "
            "(volumetric='slices') or a 2-D / 2.5-D one."
        )
    n = len(Xc) if hasattr(Xc, "__len__") else np.asarray(Xc).shape[0]
    data = read_image_frame(Xc, mode=first.mode, estimator_name=type(first).__name__)
    labels = _target_labels(target, n)
    head, feats = None, {}
    if kind == "features":
        # the probe's head, checked on the features transform gives for the explained rows
        for _, est, rows in groups:
            feats[id(est)] = np.asarray(est.transform(_rows(Xc, rows)), dtype=np.float64)
        head = linear_head(tail, final, np.vstack(list(feats.values())))
    results = {}
    for key, est, rows in groups:
        if kind == "network":
            res = _explain_network(
                est, Xc, data, rows,
                method=method, layer=layer, labels=labels, tta=tta, batch_size=batch_size,
                options={"occlusion_window": occlusion_window,
                         "occlusion_stride": occlusion_stride, "verbose": verbose},
            )  # fmt: skip
        else:
            res = _explain_probe(
                est, data, rows, feats[id(est)],
                head=head, labels=labels, layer=layer, batch_size=batch_size,
            )  # fmt: skip
        res["site"] = key
        res["estimator"] = est
        results[tuple(int(r) for r in rows)] = res
    return _assemble(method, kind, data, results, n, Xc)


def _assemble(method, kind, data, results, n, Xc) -> SaliencyMaps:
    views: list = [None] * n
    targets = [None] * n
    preds = [None] * n
    scores = np.zeros(n)
    offsets = np.zeros(n) if kind == "features" else None
    sites = [None] * n
    shapes = [None] * n
    layer = None
    for rows, res in results.items():
        est = res["estimator"]
        pre = est.preprocessor_
        layer = res["layer"]
        for i, r in enumerate(rows):
            image = np.asarray(data.images[r])
            mask = data.masks[r] if data.masks is not None else None
            mask = None if mask is None else np.asarray(mask, dtype=bool)
            shape = spatial_shape(image, pre.mode)
            planes = network_planes(pre, shape, mask)
            js = np.flatnonzero(res["owners"] == r)
            if len(js) != len(planes):  # pragma: no cover - geometry and preprocessing disagree
                raise RuntimeError(
                    f"{data.case_name(r)}: {len(js)} network images but {len(planes)} planes; "
                    "the saliency geometry does not match the preprocessing."
                )
            sample_views = []
            for j, img_planes in zip(js, planes):
                for plane in img_planes:
                    hw = plane_shape(shape, plane)
                    sal = np.zeros(hw)
                    for m in res["maps"][j]:
                        if res["preserve_sum"]:
                            sal += plane.share * resize_map(m, hw, preserve_sum=True)
                        else:
                            sal += resize_map(m, hw)
                    sample_views.append(
                        SaliencyView(
                            image=plane_of(image, plane),
                            mask=plane_of(mask, plane),
                            saliency=sal,
                            plane=plane,
                        )
                    )
            views[r] = sample_views
            shapes[r] = shape
            targets[r] = res["targets"][i]
            preds[r] = res["predictions"][i]
            scores[r] = res["scores"][i]
            if offsets is not None:
                offsets[r] = res["offsets"][i]
            sites[r] = res["site"]
    index = list(Xc.index) if isinstance(Xc, pd.DataFrame) else list(range(n))
    return SaliencyMaps(
        method=method,
        layer=layer,
        mode=next(iter(results.values()))["estimator"].preprocessor_.mode,
        views=views,
        targets=targets,
        predictions=preds,
        scores=scores,
        offsets=offsets,
        sites=None if all(s is None for s in sites) else sites,
        index=index,
        shapes=shapes,
        spacing=None if data.spacing is None else list(data.spacing),
    )
