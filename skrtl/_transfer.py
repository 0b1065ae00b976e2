"""Transfer-learning structure of a network: the classifier model, frozen layers, layer-wise
learning rates, frozen-prefix caching and ensembles.

The unit of transfer is the *transfer layer* (:func:`skrtl.get_transfer_layers`): freeze depth
``k`` freezes layers ``1..k``, and a trainable layer ``l`` trains with the learning rate
``lr * gamma ** (L - l)``. :func:`layerwise_param_groups` builds those optimizer groups for
any model, so that a user can inspect them (or use them in their own training loop); they are
real optimizer parameter groups, not the ``lr_scale`` hints that only timm's schedulers apply.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ._backbone import get_transfer_layers, load_backbone, pretrained_backbone
from ._volumetric import convert_to_3d

__all__ = [
    "EnsembleModule",
    "LayerwiseOptimizer",
    "TransferModule",
    "create_transfer_model",
    "layerwise_param_groups",
    "prefix_stages",
    "stage_list",
]


def create_transfer_model(
    name: str,
    *,
    pretrained: bool,
    weights,
    in_chans: int,
    n_out: int,
    drop_rate=None,
    volumetric: str | None = None,
) -> nn.Module:
    """A timm classifier with a new zero-initialised ``n_out`` head on pretrained weights.

    The pretrained weights come from the per-process backbone cache
    (:func:`~skrtl._backbone.pretrained_backbone`), so every fit (every member, every grid
    search fold) starts again from the same pretrained state without reloading the file. A
    zero head makes the first epochs start from the pretrained features at the loss ``log C``.
    Creating the model draws from the torch generator of the caller (seed it first).
    ``volumetric="acs"`` / ``"inflate"`` returns the 3-D network of the classifier
    (:func:`~skrtl._volumetric.convert_to_3d`); ``None`` or ``"slices"`` the 2-D one.
    """
    model = _create_2d_transfer_model(
        name,
        pretrained=pretrained,
        weights=weights,
        in_chans=in_chans,
        n_out=n_out,
        drop_rate=drop_rate,
    )
    if volumetric not in (None, "slices"):
        model = convert_to_3d(model, volumetric, copy_model=False)
    return model


def _create_2d_transfer_model(name, *, pretrained, weights, in_chans, n_out, drop_rate):
    import timm

    extra = {} if drop_rate is None else {"drop_rate": float(drop_rate)}
    if not pretrained:
        return load_backbone(name, pretrained=False, in_chans=in_chans, num_classes=n_out, **extra)
    backbone, _, _ = pretrained_backbone(name, weights, True, in_chans, torch.device("cpu"))
    arch = name.partition(".")[0] if "." in name else name
    model = timm.create_model(
        arch, pretrained=False, in_chans=in_chans, num_classes=n_out, **extra
    )
    missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
    clf_module = model.get_classifier()
    if isinstance(clf_module, nn.Linear):
        nn.init.zeros_(clf_module.weight)
        nn.init.zeros_(clf_module.bias)
    clf = (model.pretrained_cfg or {}).get("classifier", "classifier")
    clf = clf[0] if isinstance(clf, list | tuple) else clf
    if unexpected or any(not (m == clf or m.startswith(clf + ".")) for m in missing):
        raise RuntimeError(  # pragma: no cover - load_backbone already checked the weights
            f"pretrained weights of {name!r} do not fit the classifier model (missing "
            f"{sorted({p.split('.')[0] for p in missing})}, unexpected {unexpected[:5]})."
        )
    return model


def layerwise_param_groups(
    model: nn.Module,
    *,
    lr: float,
    gamma: float = 1.0,
    freeze_depth: int = 0,
    prefix: str = "",
) -> list[dict]:
    """Optimizer parameter groups with discriminative learning rates, one per trainable layer.

    Transfer layer ``l`` (1-based, :func:`skrtl.get_transfer_layers`, ``L`` layers in all)
    trains with ``lr * gamma ** (L - l)`` when ``l > freeze_depth``; layers ``1..freeze_depth``
    get no group (freeze them with ``requires_grad_(False)``).

    Parameters
    ----------
    model : torch.nn.Module
        The network (a timm classifier: its head is layer ``L``).
    lr : float
        Learning rate of the last layer (``alpha_max``).
    gamma : float in (0, 1], default=1.0
        Decay per layer towards the input.
    freeze_depth : int, default=0
        Number ``k`` of frozen leading layers.
    prefix : str, default=""
        Prefix of the parameter names in the ``"names"`` entries (e.g. ``"model."`` when the
        network sits inside a wrapper module).

    Returns
    -------
    list of dict
        ``{"params", "names", "lr", "layer", "layer_name"}`` per trainable layer, from the
        input side to the head; ready for ``torch.optim.AdamW(groups)`` (extra keys are kept
        by torch optimizers).

    Examples
    --------
    >>> from skrtl import load_backbone
    >>> from skrtl._transfer import layerwise_param_groups
    >>> model = load_backbone(pretrained=False, num_classes=2)
    >>> groups = layerwise_param_groups(model, lr=1e-3, gamma=0.5, freeze_depth=8)
    >>> [(g["layer_name"], g["lr"]) for g in groups]
    [('head', 0.0005), ('classifier', 0.001)]
    """
    layers = get_transfer_layers(model)
    n_layers = len(layers)
    if not 0 <= int(freeze_depth) <= n_layers:
        raise ValueError(
            f"freeze_depth must be in [0, {n_layers}] for a network of {n_layers} transfer "
            f"layers, got {freeze_depth!r}."
        )
    params = dict(model.named_parameters())
    groups = []
    for layer in layers:
        if layer.index <= freeze_depth:
            continue
        groups.append(
            {
                "params": [params[p] for p in layer.param_names],
                "names": [prefix + p for p in layer.param_names],
                "lr": float(lr) * float(gamma) ** (n_layers - layer.index),
                "layer": layer.index,
                "layer_name": layer.name,
            }
        )
    return groups


class LayerwiseOptimizer:
    """Optimizer factory for skorch: one parameter group per trainable transfer layer.

    skorch calls it with its default single group of all module parameters (in
    ``named_parameters`` order); it regroups them by transfer layer with the learning rates
    ``lr_of_layer[l]`` and builds ``optimizer`` (AdamW by default).

    Parameters
    ----------
    names : sequence of str
        Parameter names of the skorch module, in ``named_parameters`` order.
    layer_of : dict
        Parameter name -> transfer-layer index.
    lr_of_layer : dict
        Layer index -> learning rate.
    layer_names : dict
        Layer index -> layer name (kept in each group as ``"layer_name"``).
    weight_decay : float or None
        ``None`` passes no ``weight_decay`` (for optimizers without one).
    optimizer : type, default=torch.optim.AdamW
        A torch optimizer class taking parameter groups.
    """

    def __init__(self, names, layer_of, lr_of_layer, layer_names, weight_decay, optimizer=None):
        self.names = list(names)
        self.layer_of = dict(layer_of)
        self.lr_of_layer = dict(lr_of_layer)
        self.layer_names = dict(layer_names)
        self.weight_decay = weight_decay
        self.optimizer = optimizer

    def __call__(self, pgroups, lr=1e-3, **kwargs):
        optimizer = self.optimizer or torch.optim.AdamW
        params = [p for g in pgroups for p in g["params"]]
        if self.weight_decay is not None:  # None: an optimizer without weight decay
            kwargs.setdefault("weight_decay", self.weight_decay)
        if len(params) != len(self.names):  # pragma: no cover - defensive
            warnings.warn(
                "FineTuneClassifier: could not map parameters to layers; using one learning "
                "rate for all layers.",
                RuntimeWarning,
                stacklevel=2,
            )
            return optimizer([p for p in params if p.requires_grad], lr=lr, **kwargs)
        groups: dict[int, list] = {}
        for name, p in zip(self.names, params):
            if p.requires_grad:
                groups.setdefault(self.layer_of[name], []).append(p)
        param_groups = [
            {
                "params": groups[l],
                "lr": self.lr_of_layer[l],
                "layer": l,
                "layer_name": self.layer_names[l],
            }
            for l in sorted(groups)
        ]
        return optimizer(param_groups, lr=lr, **kwargs)


def stage_list(model: nn.Module) -> list | None:
    """Sequential decomposition of known timm families: [[modules of a stage], ...].

    Returns None when the architecture is not known; callers verify it numerically.
    """
    names = dict(model.named_children())
    if all(n in names for n in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")) and isinstance(
        model.blocks, nn.Sequential
    ):
        stages = [[model.conv_stem, model.bn1]]
        stages += [[b] for b in model.blocks]
        stages.append([model.conv_head, model.bn2])
        return stages
    resnet = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")
    if all(n in names for n in resnet):
        stages = [[model.conv1, model.bn1, model.act1, model.maxpool]]
        stages += [[getattr(model, f"layer{i}")] for i in range(1, 5)]
        return stages
    convnext = ("stem", "stages", "norm_pre", "head")
    if all(n in names for n in convnext) and isinstance(model.stages, nn.Sequential):
        stages = [[model.stem]]
        stages += [[s] for s in model.stages]
        stages.append([model.norm_pre])
        return stages
    return None


class TransferModule(nn.Module):
    """A timm classifier that can start from the cached output of its frozen prefix.

    ``start`` > 0 makes ``forward`` take the output of the first ``start`` stages
    (frozen-prefix caching, see :func:`prefix_stages`) instead of images. ``autocast_dtype``
    (``torch.bfloat16`` or ``None``) runs ``forward`` under autocast and returns float32.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.start = 0
        self.autocast_dtype = None

    def stages(self):
        return stage_list(self.model)

    def forward_stages(self, x, start: int = 0, stop: int | None = None):
        for stage in self.stages()[start:stop]:
            for m in stage:
                x = m(x)
        return x

    def forward(self, x):
        dtype = getattr(self, "autocast_dtype", None)  # modules pickled before it existed
        if dtype is None:
            return self._forward(x)
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            out = self._forward(x)
        return out.float()

    def _forward(self, x):
        if self.start == 0:
            return self.model(x)
        x = self.forward_stages(x, self.start)
        return self.model.forward_head(x)


def _named_params_of(root: nn.Module, sub: nn.Module):
    """(name in root, param) for the parameters of submodule ``sub`` of ``root``."""
    for mname, m in root.named_modules():
        if m is sub:
            prefix = f"{mname}." if mname else ""
            return [(prefix + pn, p) for pn, p in sub.named_parameters()]
    return []


def prefix_stages(module: TransferModule, k: int, layer_of: dict, x_probe) -> int:
    """Number of leading stages entirely inside the frozen layers ``1..k`` (0: no caching).

    ``layer_of`` maps ``"model.<param>"`` names to transfer-layer indices. The decomposition
    is verified numerically against the model's own forward on ``x_probe``.
    """
    stages = module.stages()
    if not stages or k < 1:
        return 0
    n = 0
    for stage in stages:
        idx = {
            layer_of[f"model.{pn}"] for m in stage for pn, _ in _named_params_of(module.model, m)
        }
        if idx and max(idx) <= k:
            n += 1
        else:
            break
    if n == 0:
        return 0
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            ref = module.model(x_probe)
            h = module.forward_stages(x_probe, 0, n)
            out = module.model.forward_head(module.forward_stages(h, n))
        ok = torch.allclose(ref, out, atol=1e-4, rtol=1e-4)
    except Exception:  # pragma: no cover - unexpected architecture
        ok = False
    finally:
        module.train(was)
    return n if ok else 0


class EnsembleModule(nn.Module):
    """The members of a fitted ensemble as one module (mean logits), for AdaBN and saliency.

    It holds the members themselves, not copies: re-estimating its BatchNorm statistics adapts
    every member.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        return torch.stack([m(x) for m in self.members]).mean(0)
