"""Frozen pretrained-CNN features for scikit-learn pipelines (linear probing).

:class:`PretrainedCNNFeatures` turns images (2-D, 2.5-D or 3-D, with optional lesion masks) into
a feature matrix with a frozen pretrained backbone, so that any scikit-learn estimator can be
trained on top of it::

    Pipeline([("cnn", PretrainedCNNFeatures()), ("clf", LogisticRegression())])

The work per image is: intensity scaling (CT windows, percentiles, ...), slicing of volumes,
resizing to ``input_size``, the backbone's normalisation, one forward pass in inference mode and
(masked) global pooling of one or several feature maps. Batches are streamed: memory holds one
batch of network inputs and the output matrix, never the whole data set as a tensor.

Speed: the network runs on a private copy whose BatchNorm layers are folded into the preceding
convolutions and whose TensorFlow-style "same" paddings are made static, in channels-last
memory format, in micro-batches that stay in the CPU cache and, by default on CPUs with
bfloat16 kernels, in mixed precision: the stem and the first block group (high resolution,
where rounding errors of smooth upsampled medical images are amplified) in float32, the rest in
bfloat16. A content-keyed, process-wide LRU cache stores each image's features, so that a
:class:`~sklearn.model_selection.GridSearchCV` over the downstream classifier runs the CNN once
per image.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from numbers import Integral, Real

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._backbone import (
    _LRU,
    DEFAULT_BACKBONE,
    _fingerprint,
    _pristine_backbone,
    _resolve_device,
    backbone_data_config,
    get_transfer_layers,
)
from ._imaging import ImageInput, read_image_frame, scale_intensity, to_network_tensor, to_slices

__all__ = [
    "PretrainedCNNFeatures",
    "clear_feature_cache",
    "feature_cache_info",
]

_POOLINGS = ("avg", "max", "gem", "avgmax")
_INTENSITIES = ("auto", "window", "percentile", "minmax", "uint8", "none")
_MIN_IMAGE_SIDE = 8
# mixed precision: transfer layers kept in float32 (stem + first block group)
_MIXED_FP32_LAYERS = 2
# images per forward pass on the CPU: activations of the high-resolution layers stay in cache
_CPU_MICRO_BATCH = 8


# --------------------------------------------------------------------------------------------
# process-wide caches
# --------------------------------------------------------------------------------------------
class _LRUBytes:
    """Thread-safe LRU mapping bounded by the total size of its numpy values."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            val = self._data.get(key)
            if val is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return val

    def put(self, key: bytes, val: np.ndarray) -> None:
        if val.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._data[key] = val
            self._bytes += val.nbytes
            while self._bytes > self.max_bytes and self._data:
                _, dropped = self._data.popitem(last=False)
                self._bytes -= dropped.nbytes

    def resize(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = int(max_bytes)
            while self._bytes > self.max_bytes and self._data:
                _, dropped = self._data.popitem(last=False)
                self._bytes -= dropped.nbytes

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0
            self.hits = 0
            self.misses = 0

    def info(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._data),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
            }


_FEATURE_CACHE = _LRUBytes(512 * 2**20)
# inference copies per exact network state and settings (see _Runner)
_RUNNER_CACHE = _LRU(2)


def clear_feature_cache() -> None:
    """Empty the process-wide CNN feature cache of :class:`PretrainedCNNFeatures`."""
    _FEATURE_CACHE.clear()


def feature_cache_info(max_mb: float | None = None) -> dict:
    """Statistics of the process-wide feature cache, optionally resizing it.

    Parameters
    ----------
    max_mb : float, optional
        New memory bound in MiB (least recently used entries are dropped beyond it).

    Returns
    -------
    dict
        ``entries``, ``bytes``, ``max_bytes``, ``hits`` and ``misses``.
    """
    if max_mb is not None:
        if not isinstance(max_mb, Real) or max_mb < 0:
            raise ValueError(f"max_mb must be a non-negative number, got {max_mb!r}.")
        _FEATURE_CACHE.resize(int(max_mb * 2**20))
    return _FEATURE_CACHE.info()


# --------------------------------------------------------------------------------------------
# network helpers
# --------------------------------------------------------------------------------------------
class _ActOnly(nn.Module):
    """What is left of a timm ``BatchNormAct2d`` once the normalisation is folded away."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x):
        return self.act(self.drop(x))


class _ConvAct(nn.Conv2d):
    """Conv2d followed by ReLU / ReLU6 in one oneDNN call (CPU inference), else two calls.

    Writing the activation into the convolution's output saves a full pass over the largest
    activations of the network (the clamp alone took ~13 % of lite0's CPU time).
    """

    def __init__(self, conv: nn.Conv2d, act: str):
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        self.requires_grad_(False)
        self.act = act
        self.scalars = [0.0, 6.0] if act == "hardtanh" else []

    def forward(self, x):
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            return torch.ops.mkldnn._convolution_pointwise(
                x,
                self.weight,
                self.bias,
                list(self.padding),
                list(self.stride),
                list(self.dilation),
                self.groups,
                self.act,
                self.scalars,
                "",
            )
        y = super().forward(x)
        return y.clamp(0.0, 6.0) if self.act == "hardtanh" else F.relu(y)


def _fusable_act(bn: nn.Module) -> str | None:
    """oneDNN post-op name of a BatchNormAct2d's activation, when it can be fused."""
    if not isinstance(getattr(bn, "drop", nn.Identity()), nn.Identity):
        return None
    act = getattr(bn, "act", None)
    if type(act) is nn.ReLU6:
        return "hardtanh"
    if type(act) is nn.ReLU:
        return "relu"
    return None


def _can_fuse_on_cpu() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )


def _foldable_bn_types() -> tuple:
    types: tuple = (nn.BatchNorm2d,)
    try:
        from timm.layers import BatchNormAct2d

        types = types + (BatchNormAct2d,)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return types


def _probe_forward(model: nn.Module, probe: torch.Tensor, hooks: list) -> None:
    """Run ``probe`` through ``model`` (no grad) for its ``hooks``, then remove them."""
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in hooks:
            h.remove()


def _fold_batchnorm(
    model: nn.Module,
    probe: torch.Tensor,
    *,
    fuse_act: bool = False,
    keep: tuple = (),
    copy_model: bool = True,
) -> tuple[nn.Module, int]:
    """Copy of ``model`` (eval) with each BatchNorm that directly follows a conv folded into it.

    The pairs are found by running ``probe`` and matching each BatchNorm input to the conv that
    produced it. With ``fuse_act`` a ReLU/ReLU6 that follows the BatchNorm moves into the conv
    too (:class:`_ConvAct`). Convs named in ``keep`` (their own output is wanted) stay as they
    are.
    The caller verifies the result numerically. ``copy_model=False`` folds ``model`` itself
    (for a private copy).
    """
    model = (copy.deepcopy(model) if copy_model else model).eval()
    types = _foldable_bn_types()
    produced: list[tuple[torch.Tensor, str]] = []
    pairs: list[tuple[str, str]] = []
    hooks = []

    def conv_hook(name):
        def hook(mod, args, out):
            produced.append((out, name))

        return hook

    def bn_hook(name):
        def hook(mod, args):
            for out, cname in reversed(produced):
                if out is args[0]:
                    pairs.append((cname, name))
                    break

        return hook

    for name, mod in model.named_modules():
        if type(mod) is nn.Conv2d:
            hooks.append(mod.register_forward_hook(conv_hook(name)))
        elif type(mod) in types and mod.track_running_stats and mod.running_mean is not None:
            hooks.append(mod.register_forward_pre_hook(bn_hook(name)))
    try:
        _probe_forward(model, probe, hooks)
    finally:
        produced.clear()
    mods = dict(model.named_modules())
    uses: dict[str, int] = {}
    for cname, _ in pairs:
        uses[cname] = uses.get(cname, 0) + 1
    n = 0
    for cname, bname in pairs:
        if uses[cname] != 1 or cname in keep:  # a requested conv output stays unfolded
            continue
        conv, bn = mods[cname], mods[bname]
        with torch.no_grad():
            inv = torch.rsqrt(bn.running_var + bn.eps)
            scale = bn.weight * inv if bn.affine else inv
            shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
            conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
            bias = shift if conv.bias is None else conv.bias * scale + shift
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        act = _fusable_act(bn) if fuse_act else None
        padding_ok = isinstance(conv.padding, tuple) and conv.padding_mode == "zeros"
        if type(bn) is nn.BatchNorm2d:
            new: nn.Module = nn.Identity()
        elif act is not None and padding_ok:
            new = nn.Identity()
            cparent, _, cattr = cname.rpartition(".")
            setattr(mods[cparent] if cparent else model, cattr, _ConvAct(conv, act))
        else:
            new = _ActOnly(bn.drop, bn.act)
        parent, _, attr = bname.rpartition(".")
        setattr(mods[parent] if parent else model, attr, new)
        n += 1
    return model, n


def _static_same_padding(model: nn.Module, probe: torch.Tensor) -> tuple[nn.Module, int]:
    """Copy of ``model`` whose timm ``Conv2dSame`` layers become plain convs for ``probe``'s size.

    TensorFlow "same" padding of a strided conv is asymmetric (one more row/column at the
    bottom/right) and timm pads the input tensor on every call, which costs a full copy of the
    activation. For a fixed input size the same result comes from symmetric padding ``P`` and a
    kernel with ``P - before`` leading zero taps: ``out[i] = sum_j w[j] x[s i + j - before]``.
    """
    model = copy.deepcopy(model).eval()
    try:
        from timm.layers.conv2d_same import Conv2dSame
    except ImportError:  # pragma: no cover - timm is a dependency
        return model, 0
    same = {n: m for n, m in model.named_modules() if type(m) is Conv2dSame}
    if not same:
        return model, 0
    sizes: dict[str, tuple] = {}

    def size_hook(name):
        def hook(mod, args):
            sizes[name] = tuple(args[0].shape[-2:])

        return hook

    hooks = [m.register_forward_pre_hook(size_hook(n)) for n, m in same.items()]
    _probe_forward(model, probe, hooks)
    n = 0
    for name, conv in same.items():
        if name not in sizes or tuple(conv.dilation) != (1, 1):
            continue
        before, after = [], []
        for dim, size in enumerate(sizes[name]):
            k, s = conv.kernel_size[dim], conv.stride[dim]
            total = max((-(-size // s) - 1) * s + k - size, 0)
            before.append(total // 2)
            after.append(total - total // 2)
        pad = [max(b, a) for b, a in zip(before, after)]
        with torch.no_grad():
            w = F.pad(
                conv.weight,
                (pad[1] - before[1], pad[1] - after[1], pad[0] - before[0], pad[0] - after[0]),
            )
            new = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                tuple(w.shape[-2:]),
                stride=conv.stride,
                padding=tuple(pad),
                groups=conv.groups,
                bias=conv.bias is not None,
            ).to(device=w.device, dtype=w.dtype)
            new.weight.copy_(w)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        new.requires_grad_(False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        n += 1
    return model, n


def _to_bf16_pre_hook(mod, args):
    return tuple(
        a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a for a in args
    )


def _cast_deep_layers_bf16(net: nn.Module, reference: nn.Module, n_fp32: int) -> int:
    """Run transfer layers ``n_fp32 + 1 ..`` of ``net`` in bfloat16, the first ones in float32.

    ``reference`` is the original network whose transfer layers name the modules (the folded
    copy keeps the module names). Each bf16 module with weights casts its input to bf16; the
    parameter-free modules between them follow their input's dtype. Returns the number of
    modules cast.
    """
    deep = {m for layer in get_transfer_layers(reference)[n_fp32:] for m in layer.module_names}
    n = 0
    for name, mod in net.named_modules():
        # folded BatchNorms are state-free placeholders now: nothing to cast
        state = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        if name not in deep or not state:
            continue
        mod.to(torch.bfloat16)
        mod.register_forward_pre_hook(_to_bf16_pre_hook)
        n += 1
    return n


def _forward_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "forward_features"):
        return model.forward_features(x)
    return model(x)


def _order_hook(order: dict, name: str):
    """Forward hook recording the first call position of module ``name`` (returns None)."""

    def hook(mod, args, out):
        if name not in order:
            order[name] = len(order)

    return hook


class _StopForward(Exception):
    """Raised by the last needed hook to skip the rest of the network."""


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:  # pragma: no cover - exotic builds
            return False
    return False


def _hash_array(h, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    h.update(str(arr.dtype).encode())
    h.update(repr(arr.shape).encode())
    h.update(arr.tobytes())


class _Runner:
    """Inference copy of a backbone: static padding, BatchNorm folded, channels-last, bf16.

    Calling it returns the requested feature maps (float32) of a normalised input batch. It is
    keyed by the exact network state (fingerprint), so estimators share it safely; a lock
    serialises forward passes because the layer hooks write into a shared dict. ``precision``
    is ``"fp32"``, ``"mixed"`` (first ``_MIXED_FP32_LAYERS`` transfer layers in float32, the
    rest in bfloat16) or ``"bf16"`` (pure bfloat16 on the CPU, autocast on CUDA).
    """

    def __init__(self, model, *, layer_modules, in_chans, size, device, precision, compiled):
        self.layer_modules = list(layer_modules)
        self.device = device
        self.precision = precision
        self.compiled = compiled
        self.lock = threading.Lock()
        probe = torch.randn(2, in_chans, *size, generator=torch.Generator().manual_seed(0))
        probe = probe.to(device)
        net, n_static = _static_same_padding(model, probe)
        fuse = device.type == "cpu" and not compiled and _can_fuse_on_cpu()
        net, n_folded = _fold_batchnorm(  # net is already a private copy
            net,
            probe,
            fuse_act=fuse,
            keep=tuple(m for m in self.layer_modules if m),
            copy_model=False,
        )
        if n_folded or n_static:
            try:
                with torch.no_grad():
                    ref = _forward_features(model, probe)
                    got = _forward_features(net, probe)
                err = float((ref - got).abs().max()) / (float(ref.abs().max()) + 1e-12)
            except RuntimeError:  # pragma: no cover - a fused kernel this build lacks
                err = float("inf")
            if not np.isfinite(err) or err > 1e-3:  # pragma: no cover - exotic layouts
                net = copy.deepcopy(model)
        net = net.eval().to(memory_format=torch.channels_last)
        self.pure_bf16 = precision == "bf16" and device.type == "cpu"
        if self.pure_bf16:
            net = net.to(torch.bfloat16)
        elif precision == "mixed":
            _cast_deep_layers_bf16(net, model, _MIXED_FP32_LAYERS)
        self.net = net
        self.micro_batch = _CPU_MICRO_BATCH if device.type == "cpu" and not compiled else None
        self.captured: dict[str, torch.Tensor] = {}
        wanted = [m for m in self.layer_modules if m]
        for m in wanted:
            net.get_submodule(m).register_forward_hook(_capture_hook(self.captured, m))
        self.runner = net
        if compiled:
            self.runner = torch.compile(_FinalFeatures(net), options={"freezing": True})
        # when the final map is not needed, the deepest requested layer stops the forward
        self.stop_hook = None
        if wanted and "" not in self.layer_modules:
            order: dict[str, int] = {}
            hooks = [
                net.get_submodule(m).register_forward_hook(_order_hook(order, m)) for m in wanted
            ]
            try:
                self(probe[:1])
            finally:
                for h in hooks:
                    h.remove()
            last = max(wanted, key=lambda n: order.get(n, -1))
            self.stop_hook = net.get_submodule(last).register_forward_hook(_stop_hook)

    def _autocast(self):
        if self.precision == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        self.captured.clear()
        final = None
        with torch.inference_mode(), self._autocast():
            try:
                final = _forward_features(self.runner, x)
            except _StopForward:
                pass
        maps = [final if m == "" else self.captured.get(m) for m in self.layer_modules]
        self.captured.clear()
        return maps

    def __call__(self, x: torch.Tensor, pad_to: int | None = None) -> list[torch.Tensor | None]:
        n = x.shape[0]
        if self.compiled and pad_to and n < pad_to:  # one static shape: no recompilation
            x = torch.cat([x, x.new_zeros((pad_to - n,) + tuple(x.shape[1:]))])
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if self.pure_bf16:
            x = x.to(torch.bfloat16)
        step = self.micro_batch or x.shape[0]
        with self.lock:
            parts = [self._forward(x[i : i + step]) for i in range(0, x.shape[0], step)]
        maps = []
        for j in range(len(self.layer_modules)):
            ts = [p[j] for p in parts]
            if any(t is None for t in ts):
                maps.append(None)
            else:
                t = ts[0] if len(ts) == 1 else torch.cat(ts)
                maps.append(t[:n].float())
        return maps


def _capture_hook(store: dict, name: str):
    def hook(mod, args, out):
        store[name] = out

    return hook


def _stop_hook(mod, args, out):
    raise _StopForward


# --------------------------------------------------------------------------------------------
# estimator
# --------------------------------------------------------------------------------------------
class PretrainedCNNFeatures(TransformerMixin, BaseEstimator):
    """Features of a frozen pretrained CNN, for linear probing in scikit-learn pipelines.

    Parameters
    ----------
    backbone : str, default="tf_efficientnet_lite0"
        timm architecture. The default ships its ImageNet weights and works offline.
    weights : str or path, optional
        Local weights file for ``backbone`` (see :func:`skrtl.load_backbone`).
    pretrained : bool, default=True
        ``False`` uses random weights (a baseline that shows what pretraining brings).
    mode : {"2d", "2.5d", "3d"}, default="2d"
        ``"2d"``: images ``(H, W)`` or ``(H, W, C)``. ``"2.5d"``: a volume ``(D, H, W)`` becomes
        one image whose channels are planes through the lesion centre (mask centroid, else the
        volume centre), see ``slices``. ``"3d"``: every axial slice (those with mask pixels when
        a mask is given) is featurised and the slice features are aggregated (``aggregate``).
    slices : {"orthogonal", "adjacent"}, default="orthogonal"
        2.5-D planes: the three orthogonal planes, or ``n_slices`` adjacent axial slices.
    n_slices : int, default=3
        Number of adjacent slices for ``slices="adjacent"``.
    aggregate : {"mean", "max"}, default="mean"
        How 3-D mode combines slice features of one volume.
    layers : "final", int, str or list of them, default="final"
        Where features are taken. ``"final"``: the backbone's last feature map. An int ``l``:
        the output of transfer layer ``l`` (1 = stem, as in :func:`skrtl.get_transfer_layers`,
        for lite0 2-8 are the block groups and 9 the head). A str: a transfer-layer name
        (``"stem"``, ``"blocks.3"``, ``"head"``) or any module name of the network. A list
        concatenates the features of several depths (shallow + deep).
    pooling : {"avg", "max", "gem", "avgmax"}, default="avg"
        Global pooling of each feature map; ``"gem"`` is generalised-mean pooling with
        exponent ``gem_p``; ``"avgmax"`` concatenates average and max pooling.
    gem_p : float, default=3.0
    mask_pooling : bool, default=True
        When the input has masks (image frame ``mask`` column), pool only over the feature-map
        cells covered by the mask: the mask is resized with the image, then area-averaged onto
        each feature map; average and GeM pooling weight every cell by its mask fraction, max
        pooling takes cells with a non-zero fraction. Without masks, whole-image pooling.
    input_size : int or (int, int), default=224
        Images are resized (bilinear, antialiased) to this size.
    intensity : {"auto", "window", "percentile", "minmax", "uint8", "none"}, default="auto"
        Intensity scaling to [0, 1] before the backbone normalisation (see
        :func:`skrtl.read_image_frame` / ``scale_intensity``). ``"auto"``: ``"window"`` when
        ``windows`` are given, ``"uint8"`` for integer images within [0, 255], else
        ``"percentile"``.
    windows : list of (level, width), optional
        CT windows in HU; each window is one input channel (e.g. ``[(40, 400), (-600, 1500),
        (400, 1800)]``: soft tissue, lung and bone as the three RGB channels).
    percentiles : (float, float), default=(0.5, 99.5)
        Clip range of ``intensity="percentile"``.
    batch_size : int, default=32
        Network images per forward pass.
    device : str, default="auto"
        ``"auto"``: CUDA when available, else CPU.
    precision : {"auto", "mixed", "fp32", "bf16"}, default="auto"
        ``"auto"``: ``"mixed"`` on CPUs with bfloat16 kernels (AVX512-BF16/AMX), else
        ``"fp32"``. ``"mixed"``: the stem and the first block group run in float32, the rest
        in bfloat16; about 1.8x faster than fp32 on such CPUs, features within ~5 % of fp32
        and a linear probe's BreastMNIST AUC within 0.002 (see ``benchmarks/``).
        ``"fp32"``: float32, numerically the plain network (BatchNorm folding changes results
        by about 1e-6). ``"bf16"``: the whole network in bfloat16 (autocast on CUDA); a little
        faster than ``"mixed"``, but rounding the smooth activations of upsampled grey-level
        images in the first block is amplified: on BreastMNIST the features move by ~14 % and
        a linear probe's AUC by 0.01-0.02. Features are always returned as float32.
    compile : bool, default=False
        Run the network through :func:`torch.compile` (with constant folding). The first
        call compiles for 10-60 s and recompiles after the BatchNorm statistics change; on
        the 2-core development CPU it ran slower than the eager default (no micro-batches or
        fused activations), so it is off by default. Only used for ``layers="final"``.
    cache : bool, default=True
        Look features up in (and store them into) the process-wide LRU cache, keyed by a hash
        of the image (and mask) content, every parameter that changes the features and the
        exact network state. See :func:`feature_cache_info` / :func:`clear_feature_cache`.
    verbose : int, default=0
        ``> 0`` shows a progress bar during extraction.

    Attributes
    ----------
    model_ : torch.nn.Module
        The frozen backbone (eval mode) on ``device_``. To keep ``fit`` cheap (grid searches
        refit the pipeline many times) it is shared by all estimators fitted with the same
        backbone: treat it as read-only.
    device_ : torch.device
    precision_ : str
        ``"mixed"``, ``"bf16"`` or ``"fp32"``.
    in_chans_ : int
        Network input channels (3, or the number of intensity channels when it is not 1 or 3).
    layers_ : list of str
        Resolved layer tags (``"l9"``, ...) in output order.
    n_features_out_ : int

    Notes
    -----
    The network output does not depend on the training data: ``fit`` only loads the backbone
    and validates the input. Features are deterministic for a given device and precision.
    Masks, spacing and site labels travel in the image frame (:func:`skrtl.make_image_frame`),
    which survives :class:`~sklearn.pipeline.Pipeline`, cross-validation and grid search.
    """

    _parameter_constraints: dict = {
        "backbone": [str],
        "weights": [str, os.PathLike, None],
        "pretrained": ["boolean"],
        "mode": [StrOptions({"2d", "2.5d", "3d"})],
        "slices": [StrOptions({"orthogonal", "adjacent"})],
        "n_slices": [Interval(Integral, 1, None, closed="left")],
        "aggregate": [StrOptions({"mean", "max"})],
        "layers": [str, Integral, list, tuple],
        "pooling": [StrOptions(set(_POOLINGS))],
        "gem_p": [Interval(Real, 0, None, closed="neither")],
        "mask_pooling": ["boolean"],
        "input_size": [Interval(Integral, 1, None, closed="left"), tuple, list],
        "intensity": [StrOptions(set(_INTENSITIES))],
        "windows": [list, tuple, None],
        "percentiles": [tuple, list],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "precision": [StrOptions({"auto", "mixed", "bf16", "fp32"})],
        "compile": ["boolean"],
        "cache": ["boolean"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        *,
        backbone=DEFAULT_BACKBONE,
        weights=None,
        pretrained=True,
        mode="2d",
        slices="orthogonal",
        n_slices=3,
        aggregate="mean",
        layers="final",
        pooling="avg",
        gem_p=3.0,
        mask_pooling=True,
        input_size=224,
        intensity="auto",
        windows=None,
        percentiles=(0.5, 99.5),
        batch_size=32,
        device="auto",
        precision="auto",
        compile=False,
        cache=True,
        verbose=0,
    ):
        self.backbone = backbone
        self.weights = weights
        self.pretrained = pretrained
        self.mode = mode
        self.slices = slices
        self.n_slices = n_slices
        self.aggregate = aggregate
        self.layers = layers
        self.pooling = pooling
        self.gem_p = gem_p
        self.mask_pooling = mask_pooling
        self.input_size = input_size
        self.intensity = intensity
        self.windows = windows
        self.percentiles = percentiles
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.compile = compile
        self.cache = cache
        self.verbose = verbose

    # ----------------------------------------------------------------------------------------
    # parameter checks that _parameter_constraints cannot express
    # ----------------------------------------------------------------------------------------
    def _check_extra_params(self) -> tuple[tuple[int, int], list | None]:
        size = self.input_size
        if isinstance(size, Integral):
            size = (int(size), int(size))
        else:
            size = tuple(size)
            if len(size) != 2 or not all(isinstance(s, Integral) and s > 0 for s in size):
                raise ValueError(
                    f"input_size must be a positive int or a pair (height, width), got "
                    f"{self.input_size!r}."
                )
            size = (int(size[0]), int(size[1]))
        windows = None
        if self.windows is not None:
            try:
                windows = [(float(lv), float(wd)) for lv, wd in self.windows]
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    "windows must be a list of (level, width) pairs in HU, e.g. "
                    f"[(40, 400), (-600, 1500)]; got {self.windows!r}."
                ) from exc
            if not windows or any(wd <= 0 for _, wd in windows):
                raise ValueError(
                    f"windows must be a non-empty list of (level, width) with width > 0, got "
                    f"{self.windows!r}."
                )
        if self.intensity == "window" and windows is None:
            raise ValueError(
                "intensity='window' needs windows=[(level, width), ...], e.g. [(40, 400)]."
            )
        if windows is not None and self.intensity not in ("auto", "window"):
            raise ValueError(
                f"windows are given but intensity={self.intensity!r}; use intensity='window' "
                "(or 'auto') with windows, or drop windows."
            )
        p = tuple(self.percentiles)
        if len(p) != 2 or not (0 <= p[0] < p[1] <= 100):
            raise ValueError(
                f"percentiles must be (low, high) with 0 <= low < high <= 100, got "
                f"{self.percentiles!r}."
            )
        if self.mode == "2.5d" and self.slices == "orthogonal" and windows and len(windows) > 1:
            raise ValueError(
                "mode='2.5d' with slices='orthogonal' stacks three planes as channels and "
                f"needs one intensity channel, got {len(windows)} windows; use one window or "
                "slices='adjacent'."
            )
        return size, windows

    def _n_channels(self, windows) -> int:
        """Intensity channels of one network image (before replication to RGB)."""
        if self.mode == "2.5d":
            if self.slices == "orthogonal":
                return 3
            return self.n_slices * (len(windows) if windows else 1)
        return len(windows) if windows else -1  # -1: from the data

    # ----------------------------------------------------------------------------------------
    def _layer_entries(self) -> list:
        layers = self.layers
        entries = list(layers) if isinstance(layers, list | tuple) else [layers]
        if not entries:
            raise ValueError("layers must not be empty; use 'final' or e.g. [3, 'final'].")
        for e in entries:
            if isinstance(e, bool) or not isinstance(e, str | Integral):
                raise ValueError(
                    f"layers entries must be 'final', an int transfer-layer index or a module "
                    f"name, got {e!r} in layers={layers!r}."
                )
        return entries

    def _resolve_layers(self, model: nn.Module, probe: torch.Tensor) -> list[tuple[str, str]]:
        """Map ``layers`` to (tag, module name); module name "" means the final feature map."""
        tl = get_transfer_layers(model)
        by_name = {layer.name: layer for layer in tl}
        modules = dict(model.named_modules())
        # execution order of modules, to pick the last module of multi-module layers
        order: dict[str, int] = {}
        hooks = [
            mod.register_forward_hook(_order_hook(order, name))
            for name, mod in model.named_modules()
            if name
        ]
        try:
            with torch.no_grad():
                _forward_features(model, probe)
        finally:
            for h in hooks:
                h.remove()
        n_layers = len(tl)
        out: list[tuple[str, str]] = []
        for e in self._layer_entries():
            if isinstance(e, str) and e == "final":
                tag, mname = f"l{n_layers}", ""
            elif isinstance(e, Integral):
                if not 1 <= int(e) <= n_layers:
                    raise ValueError(
                        f"layers={self.layers!r}: layer index {e!r} is out of range; "
                        f"{self.backbone!r} has transfer layers 1..{n_layers} "
                        f"({', '.join(f'{t.index}={t.name}' for t in tl)})."
                    )
                layer = tl[int(e) - 1]
                tag, mname = f"l{layer.index}", self._module_of_layer(layer, modules, order)
                if layer.index == n_layers:
                    mname = ""
            elif e in by_name:
                layer = by_name[e]
                tag, mname = f"l{layer.index}", self._module_of_layer(layer, modules, order)
                if layer.index == n_layers:
                    mname = ""
            elif e in modules and e:
                if e not in order:
                    raise ValueError(
                        f"layers={self.layers!r}: module {e!r} is not called by the network's "
                        "feature forward pass; choose another module."
                    )
                tag, mname = re.sub(r"[^0-9a-zA-Z]+", "_", e), e
            else:
                raise ValueError(
                    f"layers={self.layers!r}: {e!r} is neither 'final', a transfer-layer index "
                    f"1..{n_layers}, a transfer-layer name ({sorted(by_name)!r}) nor a module "
                    f"name of {self.backbone!r}."
                )
            if (tag, mname) not in out:
                out.append((tag, mname))
        return out

    @staticmethod
    def _module_of_layer(layer, modules, order) -> str:
        if layer.name in modules and layer.name in order:
            return layer.name
        called = [m for m in layer.module_names if m in order]
        if not called:
            raise ValueError(f"transfer layer {layer.name!r} is not used by forward_features.")
        return max(called, key=order.__getitem__)

    # ----------------------------------------------------------------------------------------
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Load the backbone and validate the input (no training: the network is frozen).

        Parameters
        ----------
        X : ndarray of shape (n, H, W), (n, H, W, C) or (n, D, H, W), or image frame
            Images (see :func:`skrtl.make_image_frame` for masks, spacing and sites).
        y : ignored

        Returns
        -------
        self
        """
        size, windows = self._check_extra_params()
        self._read(X)  # validates the images
        n_chan = self._n_channels(windows)
        if n_chan == -1:
            n_chan = self._data_channels(X)
        in_chans = 3 if n_chan in (1, 3) else n_chan
        self.device_ = _resolve_device(self.device)
        if self.precision == "auto":
            mixed = self.device_.type == "cpu" and _bf16_supported(self.device_)
            self.precision_ = "mixed" if mixed else "fp32"
        elif self.precision in ("bf16", "mixed"):
            if not _bf16_supported(self.device_):
                raise ValueError(
                    f"precision={self.precision!r} is not supported on {self.device_} (no "
                    "bfloat16 kernels); use precision='auto' (bfloat16 only where supported) "
                    "or 'fp32'."
                )
            self.precision_ = self.precision
        else:
            self.precision_ = "fp32"
        model, fp, memo = _pristine_backbone(
            self.backbone, self.weights, self.pretrained, in_chans, self.device_
        )
        cfg = backbone_data_config(model)
        if min(size) < cfg["min_size"]:
            raise ValueError(
                f"input_size={self.input_size!r} is smaller than the minimum "
                f"{cfg['min_size']} px that {self.backbone!r} accepts (its total stride); use "
                "input_size >= that (224 is the pretraining size)."
            )
        self.in_chans_ = in_chans
        self.input_size_ = size
        self.windows_ = windows
        self.mean_ = tuple(cfg["mean"])
        self.std_ = tuple(cfg["std"])
        memo_key = (size, repr(self._layer_entries()))
        if memo_key not in memo:
            probe = torch.zeros(1, in_chans, *size, device=self.device_)
            resolved = self._resolve_layers(model, probe)
            memo[memo_key] = (resolved, self._probe_dims(model, resolved, probe))
        resolved, dims = memo[memo_key]
        # shared with other estimators until _skrtl_torch_module() takes a private copy
        self.model_ = model
        self._owns_model = False
        self._fingerprint = fp
        self._fast = None
        self.layers_ = [tag for tag, _ in resolved]
        self._layer_modules = [m for _, m in resolved]
        self.layer_dims_ = dims
        pools = ["avg", "max"] if self.pooling == "avgmax" else [self.pooling]
        names = []
        for tag, dim in zip(self.layers_, dims):
            for pool in pools:
                names.extend(f"cnn_{tag}_{pool}_{k:04d}" for k in range(dim))
        self._feature_names = np.asarray(names, dtype=object)
        self.n_features_out_ = len(names)
        return self

    def _probe_dims(self, model, resolved, probe) -> list[int]:
        got: dict[str, int] = {}
        hooks = [
            model.get_submodule(m).register_forward_hook(
                lambda mod, a, o, n=m: got.__setitem__(n, int(o.shape[1]))
            )
            for _, m in resolved
            if m
        ]
        try:
            with torch.no_grad():
                final = _forward_features(model, probe)
        finally:
            for h in hooks:
                h.remove()
        if final.ndim != 4:
            raise ValueError(
                f"backbone {self.backbone!r} does not produce a spatial feature map (got shape "
                f"{tuple(final.shape)}); PretrainedCNNFeatures needs a CNN."
            )
        got[""] = int(final.shape[1])
        return [got[m] for _, m in resolved]

    # ----------------------------------------------------------------------------------------
    def _read(self, X):
        data = read_image_frame(X, mode=self.mode, estimator_name=type(self).__name__)
        for i, img in enumerate(data.images):
            spatial = img.shape[:2] if self.mode == "2d" else img.shape[1:]
            if min(spatial) < _MIN_IMAGE_SIDE:
                raise ValueError(
                    f"image {i} has spatial shape {tuple(img.shape)!r}: sides below "
                    f"{_MIN_IMAGE_SIDE} px cannot be resized meaningfully to "
                    f"input_size={self.input_size!r}. Crop larger regions or drop the sample."
                )
        return data

    def _data_channels(self, X) -> int:
        data = self._read(X)
        img = data.images[0]
        return img.shape[2] if (self.mode == "2d" and img.ndim == 3) else 1

    @staticmethod
    def _raw_integer_flags(X, n: int) -> list[bool]:
        if isinstance(X, pd.DataFrame):
            return [np.issubdtype(np.asarray(v).dtype, np.integer) for v in X["image"]]
        arr = np.asarray(X) if not isinstance(X, np.ndarray) else X
        if arr.dtype == object:
            return [np.issubdtype(np.asarray(v).dtype, np.integer) for v in arr]
        return [np.issubdtype(arr.dtype, np.integer)] * n

    def _scale(self, img: np.ndarray, is_int: bool) -> np.ndarray:
        method = self.intensity
        if method == "auto":
            if self.windows_:
                method = "window"
            elif is_int and img.min() >= 0 and img.max() <= 255:
                method = "uint8"
            else:
                method = "percentile"
        channel_axis = -1 if (self.mode == "2d" and img.ndim == 3) else None
        return scale_intensity(
            img,
            method=method,
            windows=self.windows_,
            percentiles=tuple(self.percentiles),
            channel_axis=channel_axis,
        )

    def _network_images(self, img, mask, is_int, i):
        """Scaled 2-D network images (h, w, c) and masks of one sample."""
        scaled = self._scale(img, is_int)
        if self.mode == "2d":
            imgs, masks = [scaled], [mask]
        else:
            imgs, masks = to_slices(
                scaled,
                mask,
                mode=self.mode,
                slices=self.slices,
                n_slices=self.n_slices,
                slice_selection="mask",
            )
        return imgs, masks

    def _iter_batches(self, data: ImageInput, flags, rows, batch_size: int) -> Iterator:
        """Yield (x, m, owners) network batches for the samples ``rows`` of ``data``."""
        imgs_b: list = []
        masks_b: list = []
        owners: list[int] = []
        use_masks = data.masks is not None
        for i in rows:
            mask = data.masks[i] if use_masks else None
            ims, ms = self._network_images(data.images[i], mask, flags[i], i)
            for im, m in zip(ims, ms):
                imgs_b.append(im)
                masks_b.append(m)
                owners.append(i)
                if len(imgs_b) == batch_size:
                    yield self._to_tensor(imgs_b, masks_b if use_masks else None), owners
                    imgs_b, masks_b, owners = [], [], []
        if imgs_b:
            yield self._to_tensor(imgs_b, masks_b if use_masks else None), owners

    def _to_tensor(self, imgs, masks):
        """Normalised NCHW batch (and resized masks), as :func:`to_network_tensor` computes it.

        Images of one shape are resized together in one call (much faster for many small
        images); anything unusual falls back to the per-image foundation function.
        """
        shapes = {np.shape(im) for im in imgs}
        if len(shapes) != 1:
            return to_network_tensor(
                imgs,
                size=self.input_size_,
                in_chans=self.in_chans_,
                mean=self.mean_,
                std=self.std_,
                masks=masks,
            )
        size = self.input_size_
        arr = np.stack([np.asarray(im, dtype=np.float32) for im in imgs])
        if arr.ndim == 3:
            arr = arr[..., None]
        t = torch.from_numpy(arr).permute(0, 3, 1, 2)
        c = t.shape[1]
        if c != self.in_chans_ and c != 1 and self.in_chans_ != 1:
            raise ValueError(
                f"images have {c} channels but the network was fitted with {self.in_chans_}; "
                "transform images like those seen in fit (same channels / CT windows)."
            )
        if self.in_chans_ == 1 and c != 1:
            t = t.mean(dim=1, keepdim=True)
        if tuple(t.shape[2:]) != size:
            t = F.interpolate(
                t.contiguous(), size=size, mode="bilinear", align_corners=False, antialias=True
            )
        if t.shape[1] != self.in_chans_:
            t = t.expand(-1, self.in_chans_, -1, -1)
        mean_t = torch.tensor(self.mean_, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(self.std_, dtype=torch.float32).view(1, -1, 1, 1)
        if mean_t.shape[1] != self.in_chans_:
            mean_t = mean_t.mean(1, keepdim=True)
            std_t = std_t.mean(1, keepdim=True)
        x = ((t - mean_t) / std_t).contiguous()
        mt = None
        if masks is not None and any(m is not None for m in masks):
            hw = arr.shape[1:3]
            ms = np.stack(
                [
                    np.ones(hw, dtype=np.float32) if m is None else np.asarray(m, np.float32)
                    for m in masks
                ]
            )
            mt = torch.from_numpy(ms)[:, None]
            if tuple(mt.shape[2:]) != size:
                mt = F.interpolate(mt, size=size, mode="area")
        return x, mt

    # ----------------------------------------------------------------------------------------
    # fast network copy
    # ----------------------------------------------------------------------------------------
    def _get_fast(self) -> _Runner:
        fast = getattr(self, "_fast", None)
        if fast is not None:
            return fast
        compiled = bool(self.compile) and self._layer_modules == [""]
        if self.compile and not compiled:
            warnings.warn(
                "compile=True is only used with layers='final'; running eagerly.",
                UserWarning,
                stacklevel=3,
            )
        key = (
            self._state_fingerprint(),
            str(self.device_),
            self.precision_,
            tuple(self._layer_modules),
            self.in_chans_,
            self.input_size_,
            compiled,
        )
        runner = _RUNNER_CACHE.get(key)
        if runner is None:
            runner = _Runner(
                self.model_,
                layer_modules=self._layer_modules,
                in_chans=self.in_chans_,
                size=self.input_size_,
                device=self.device_,
                precision=self.precision_,
                compiled=compiled,
            )
            _RUNNER_CACHE.put(key, runner)
        self._fast = runner
        return runner

    def _state_fingerprint(self) -> str:
        fp = getattr(self, "_fingerprint", None)
        if fp is None:
            fp = self._fingerprint = _fingerprint(self.model_)
        return fp

    # ----------------------------------------------------------------------------------------
    def _pool(self, fmap: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        pools = ["avg", "max"] if self.pooling == "avgmax" else [self.pooling]
        w = None
        if mask is not None:
            w = F.adaptive_avg_pool2d(mask.to(fmap.device, torch.float32), fmap.shape[2:])
            wsum = w.sum(dim=(2, 3))
            if bool((wsum <= 0).any()):  # pragma: no cover - read_image_frame rejects these
                raise ValueError("a mask is empty after resizing; masked pooling is undefined.")
        outs = []
        for pool in pools:
            if pool == "avg":
                out = fmap.mean(dim=(2, 3)) if w is None else (fmap * w).sum((2, 3)) / wsum
            elif pool == "max":
                if w is None:
                    out = fmap.amax(dim=(2, 3))
                else:
                    out = fmap.masked_fill(w <= 0, float("-inf")).amax(dim=(2, 3))
            else:  # gem
                p = float(self.gem_p)
                f = fmap.clamp_min(1e-6).pow(p)
                m = f.mean(dim=(2, 3)) if w is None else (f * w).sum((2, 3)) / wsum
                out = m.pow(1.0 / p)
            outs.append(out)
        return torch.cat(outs, dim=1)

    def _features_of_batch(self, x, m, fast: _Runner) -> np.ndarray:
        maps = fast(x, pad_to=self.batch_size)
        mask = m if (self.mask_pooling and m is not None) else None
        feats = [self._pool(fmap, mask) for fmap in maps]
        return torch.cat(feats, dim=1).cpu().numpy().astype(np.float32, copy=False)

    # ----------------------------------------------------------------------------------------
    def _config_key(self) -> bytes:
        fp = self._state_fingerprint()
        cfg = (
            "v1",
            self.backbone,
            fp,
            self.mode,
            self.slices if self.mode == "2.5d" else None,
            self.n_slices if self.mode == "2.5d" and self.slices == "adjacent" else None,
            self.aggregate if self.mode == "3d" else None,
            tuple(self._layer_modules),
            self.pooling,
            float(self.gem_p) if self.pooling == "gem" else None,
            bool(self.mask_pooling),
            self.input_size_,
            self.in_chans_,
            self.intensity,
            tuple(self.windows_ or ()),
            tuple(float(p) for p in self.percentiles),
            self.device_.type,
            self.precision_,
            bool(self.compile) and self._layer_modules == [""],
        )
        return hashlib.blake2b(repr(cfg).encode(), digest_size=16).digest()

    def _sample_keys(self, data, flags, base: bytes) -> list[bytes]:
        keys = []
        for i, img in enumerate(data.images):
            h = hashlib.blake2b(base, digest_size=20)
            _hash_array(h, img)
            h.update(b"i" if flags[i] else b"f")
            mask = data.masks[i] if data.masks is not None else None
            # masks change the features through masked pooling and volume slicing
            if mask is not None and (self.mask_pooling or self.mode != "2d"):
                _hash_array(h, np.packbits(mask))
                h.update(repr(mask.shape).encode())
            else:
                h.update(b"nomask")
            keys.append(h.digest())
        return keys

    def transform(self, X):
        """Extract CNN features.

        Parameters
        ----------
        X : ndarray or image frame
            Images as in :meth:`fit`.

        Returns
        -------
        ndarray of shape (n_samples, n_features_out_), float32
        """
        check_is_fitted(self, "model_")
        data = self._read(X)
        n = len(data)
        flags = self._raw_integer_flags(X, n)
        out = np.zeros((n, self.n_features_out_), dtype=np.float32)
        todo = list(range(n))
        keys = None
        if self.cache:
            keys = self._sample_keys(data, flags, self._config_key())
            todo = []
            for i, key in enumerate(keys):
                hit = _FEATURE_CACHE.get(key)
                if hit is None:
                    todo.append(i)
                else:
                    out[i] = hit
        if todo:
            self._extract(data, flags, todo, out)
            if keys is not None:
                for i in todo:
                    _FEATURE_CACHE.put(keys[i], out[i].copy())
        return out

    def _extract(self, data, flags, rows: list[int], out: np.ndarray) -> None:
        fast = self._get_fast()
        counts = np.zeros(out.shape[0], dtype=np.int64)
        use_max = self.mode == "3d" and self.aggregate == "max"
        if use_max:
            out[rows] = -np.inf
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(rows),
            disable=not self.verbose,
            desc=f"{type(self).__name__}[{self.backbone}]",
            unit="img",
        )
        done = set()
        try:
            for (x, m), owners in self._iter_batches(data, flags, rows, self.batch_size):
                feats = self._features_of_batch(x, m, fast)
                owners = np.asarray(owners)
                if use_max:
                    np.maximum.at(out, owners, feats)
                else:
                    np.add.at(out, owners, feats)
                np.add.at(counts, owners, 1)
                new = set(owners.tolist()) - done
                done |= new
                bar.update(len(new))
        finally:
            bar.close()
        if not use_max:
            rows_a = np.asarray(rows)
            out[rows_a] /= counts[rows_a, None]

    # ----------------------------------------------------------------------------------------
    def get_feature_names_out(self, input_features=None):
        """Feature names ``cnn_<layer>_<pooling>_<channel>``, e.g. ``cnn_l9_avg_0012``.

        Parameters
        ----------
        input_features : ignored
            Images have no input feature names.

        Returns
        -------
        ndarray of str
        """
        check_is_fitted(self, "model_")
        return self._feature_names.copy()

    # ----------------------------------------------------------------------------------------
    # hooks for skrtl._adabn.AdaBN
    # ----------------------------------------------------------------------------------------
    def _skrtl_torch_module(self) -> nn.Module:
        """The backbone, as a private copy (callers such as AdaBN may change its state)."""
        check_is_fitted(self, "model_")
        if not getattr(self, "_owns_model", True):
            self.model_ = copy.deepcopy(self.model_)
            self._owns_model = True
        return self.model_

    def _skrtl_iter_inputs(self, X, batch_size=None):
        """Yield ``(x, idx)``: normalised float32 NCHW input batches on the model's device."""
        check_is_fitted(self, "model_")
        data = self._read(X)
        flags = self._raw_integer_flags(X, len(data))
        bs = self.batch_size if batch_size is None else int(batch_size)
        for (x, _), owners in self._iter_batches(data, flags, range(len(data)), bs):
            yield x.to(self.device_), np.asarray(owners)

    def _skrtl_invalidate_cache(self) -> None:
        """Forget the fast network copy and the state fingerprint (BatchNorm stats changed).

        Cached features are keyed by the exact network state, so entries of other states stay
        valid and are reused when that state comes back.
        """
        self._fast = None
        self._fingerprint = None

    # ----------------------------------------------------------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fast"] = None
        if "_owns_model" in state:
            state["_owns_model"] = True  # an unpickled model_ is a private copy
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.requires_fit = True
        tags.transformer_tags.preserves_dtype = []
        tags.non_deterministic = False
        return tags


class _FinalFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return _forward_features(self.net, x)
