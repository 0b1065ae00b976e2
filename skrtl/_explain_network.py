"""Saliency of fine-tuned networks: Grad-CAM, Grad-CAM++, Score-CAM and occlusion.

The class activation methods come from pytorch-grad-cam (``grad-cam`` on PyPI), occlusion
from captum; this module only chooses the layer, runs them on private copies of the members of
a fitted network (so that no gradient, hook or mode change ever touches the estimator), and
averages what an ensemble and mirror-image test-time augmentation average in ``predict_proba``.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from numbers import Integral

import numpy as np
import torch
from torch import nn

from ._backbone import get_transfer_layers
from ._transfer import TransferModule
from .utils import call_order, forward_hooks

__all__ = [
    "LAYER_METHODS",
    "NETWORK_METHODS",
    "network_saliency",
    "resolve_saliency_layer",
    "timm_model_of",
]

#: Class activation maps of a layer (pytorch-grad-cam): they need ``layer``.
LAYER_METHODS = ("gradcam", "gradcam++", "scorecam")
#: Every saliency method for a torch classifier network.
NETWORK_METHODS = (*LAYER_METHODS, "occlusion")


def timm_model_of(member: nn.Module) -> nn.Module:
    """The timm classifier inside a member of a fitted classifier (a :class:`TransferModule`)."""
    return member.model if isinstance(member, TransferModule) else member


def _output_module(layer, modules: dict, order: dict) -> str:
    """The module whose output is the output of a transfer layer (its last called module)."""
    if layer.name in modules and layer.name in order:
        return layer.name
    called = [m for m in layer.module_names if m in order]
    if not called:
        raise ValueError(f"transfer layer {layer.name!r} is not used by the forward pass.")
    return max(called, key=order.__getitem__)


def resolve_saliency_layer(model: nn.Module, layer, probe: torch.Tensor) -> tuple[str, str]:
    """``(transfer-layer or module name, module name)`` of the layer to explain.

    Parameters
    ----------
    model : torch.nn.Module
        The timm classifier (:func:`timm_model_of`).
    layer : None, int or str
        ``None``: the deepest transfer layer with a spatial (4-D) output, the last
        convolutional stage (``"head"`` of EfficientNets, ``"layer4"`` of ResNets). An int:
        transfer layer ``layer`` (1 = stem, :func:`skrtl.get_transfer_layers`). A str: a
        transfer-layer name or a module name of the network.
    probe : torch.Tensor
        One network input (for the call order and output shapes).
    """
    layers = get_transfer_layers(model)
    modules = dict(model.named_modules())
    order = call_order(model, probe)
    ndim: dict[str, int] = {}

    def make(name):
        def hook(mod, args, out):
            if isinstance(out, torch.Tensor):
                ndim.setdefault(name, out.ndim)

        return hook

    with forward_hooks([(m, make(n)) for n, m in modules.items() if n]), torch.no_grad():
        model(probe)
    spatial = [
        (tl.name, name)
        for tl in layers
        if ndim.get(name := _output_module(tl, modules, order)) == 4
    ]
    listing = ", ".join(f"{tl.index}={tl.name}" for tl in layers)
    if layer is None:
        if not spatial:
            raise ValueError(
                f"the network has no transfer layer with a spatial output ({listing})."
            )
        return spatial[-1]
    if isinstance(layer, Integral) and not isinstance(layer, bool):
        if not 1 <= int(layer) <= len(layers):
            raise ValueError(
                f"layer={layer!r} is out of range: the network has transfer layers 1.."
                f"{len(layers)} ({listing})."
            )
        tl = layers[int(layer) - 1]
        name = _output_module(tl, modules, order)
        if ndim.get(name) != 4:
            raise ValueError(
                f"layer={layer!r} ({tl.name!r}) has no spatial output to map; choose one of "
                f"{[n for n, _ in spatial]!r}."
            )
        return tl.name, name
    if isinstance(layer, str):
        by_name = {tl.name: tl for tl in layers}
        if layer in by_name:
            return resolve_saliency_layer(model, by_name[layer].index, probe)
        if layer in modules and layer:
            if ndim.get(layer) != 4:
                raise ValueError(
                    f"layer={layer!r}: that module "
                    + ("is not called by the forward pass" if layer not in order else
                       f"outputs a {ndim.get(layer)}-D tensor, not a feature map")
                    + f"; choose a convolutional layer, e.g. {[n for n, _ in spatial][-3:]!r}."
                )  # fmt: skip
            return layer, layer
    raise ValueError(
        f"layer={layer!r} is neither None, a transfer-layer index, a transfer-layer name "
        f"({listing}) nor a module name of the network."
    )


def _cam_class(method: str):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM

    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM}[method]


def _private_copy(member: nn.Module) -> nn.Module:
    net = copy.deepcopy(member).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")  # pragma: no cover


def network_saliency(
    members: Sequence[nn.Module],
    x: torch.Tensor,
    targets: np.ndarray,
    *,
    method: str,
    module_name: str | None,
    tta: bool,
    batch_size: int,
    window: int | None = None,
    stride: int | None = None,
    verbose: int = 0,
) -> np.ndarray:
    """Saliency maps of the network images ``x`` for the class indices ``targets``.

    Parameters
    ----------
    members : sequence of torch.nn.Module
        The networks of a fitted classifier (one, or the members of an ensemble); each is
        deep-copied, so the estimator is never changed.
    x : torch.Tensor of shape (n, C, h, w)
        Network inputs, as the estimator's preprocessing makes them.
    targets : ndarray of int of shape (n,)
        The class (output index) explained for each network image.
    method : {"gradcam", "gradcam++", "scorecam", "occlusion"}
    module_name : str or None
        Module of the timm classifier whose output the CAM methods use.
    tta : bool
        Also explain the mirror image and mirror its map back, averaging the two (what
        ``predict_proba`` averages with ``tta=True``).
    batch_size : int
    window, stride : int, optional
        Occlusion patch side and step in network-input pixels (default: a sixth of the input
        side, half of it).
    verbose : int
        Show the progress bars of the libraries.

    Returns
    -------
    ndarray of float32 of shape (n, h, w)
        The mean over members (and mirror views) of the maps: in [0, 1] for the CAM methods
        (pytorch-grad-cam scales each map to [0, 1]); for occlusion the drop of the target
        logit when a patch around the pixel is replaced by the normalised zero (the mean
        intensity), averaged over the patches covering it.
    """
    if method not in NETWORK_METHODS:
        raise ValueError(f"method must be one of {NETWORK_METHODS!r}, got {method!r}.")
    n, c, h, w = (int(v) for v in x.shape)
    targets = np.asarray(targets, dtype=int)
    total = np.zeros((n, h, w), dtype=np.float64)
    views = [False, True] if tta else [False]
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO())
    for member in members:
        net = _private_copy(member)
        device = _device_of(net)
        if method == "occlusion":
            from captum.attr import Occlusion

            k = int(window) if window is not None else max(2, -(-min(h, w) // 6))
            s = int(stride) if stride is not None else max(1, -(-k // 2))
            explainer = Occlusion(net)
            release = None
        else:
            layer_module = timm_model_of(net).get_submodule(module_name)
            explainer = _cam_class(method)(model=net, target_layers=[layer_module])
            explainer.batch_size = int(batch_size)  # Score-CAM's forward batches
            release = explainer.activations_and_grads.release
        try:
            for flip in views:
                for start in range(0, n, batch_size):
                    xb = x[start : start + batch_size].to(device)
                    tb = targets[start : start + batch_size]
                    if flip:
                        xb = xb.flip(-1)
                    if method == "occlusion":
                        with torch.no_grad(), quiet:
                            attr = explainer.attribute(
                                xb,
                                sliding_window_shapes=(c, k, k),
                                strides=(c, s, s),
                                baselines=0.0,
                                target=[int(t) for t in tb],
                                perturbations_per_eval=max(1, 64 // len(xb)),
                                show_progress=bool(verbose),
                            )
                        out = attr.sum(dim=1).detach().cpu().double().numpy()
                    else:
                        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

                        xb = xb.detach().clone().requires_grad_(True)
                        with torch.enable_grad(), quiet:
                            out = explainer(
                                input_tensor=xb,
                                targets=[ClassifierOutputTarget(int(t)) for t in tb],
                            )
                        out = np.asarray(out, dtype=np.float64)
                    if flip:
                        out = out[..., ::-1]
                    total[start : start + len(xb)] += out
        finally:
            if release is not None:
                release()
    return (total / (len(members) * len(views))).astype(np.float32)
