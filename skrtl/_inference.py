"""Fast inference copies of a backbone: the engineering behind CNN feature extraction.

:class:`InferenceRunner` turns a frozen timm network into a private copy that computes the same
feature maps faster on the CPU:

* timm's TensorFlow-style "same" paddings become static (:func:`static_same_padding`);
* every BatchNorm that directly follows a convolution is folded into it
  (:func:`fold_batchnorm`), and a ReLU / ReLU6 after it is fused into the convolution as a
  oneDNN post-op (:class:`ConvAct`);
* channels-last memory format and micro-batches that keep the high-resolution activations in
  the CPU cache;
* mixed precision: the first transfer layers in float32, the rest in bfloat16
  (:func:`cast_deep_layers_bf16`), or pure bfloat16.

Each transformation is checked numerically against the original network on a probe input and
dropped when it does not reproduce it.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._backbone import get_transfer_layers
from .utils import (
    StopForward,
    call_order,
    can_fuse_on_cpu,
    capture_outputs,
    forward_hooks,
    stop_after,
)

__all__ = [
    "CPU_MICRO_BATCH",
    "MIXED_FP32_LAYERS",
    "ConvAct",
    "conv_bn_pairs",
    "InferenceRunner",
    "cast_deep_layers_bf16",
    "fold_batchnorm",
    "forward_features",
    "static_same_padding",
]

#: Mixed precision: number of leading transfer layers kept in float32 (stem + first blocks).
MIXED_FP32_LAYERS = 2
#: Images per forward pass on the CPU: the high-resolution activations stay in cache.
CPU_MICRO_BATCH = 8


def forward_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last feature map of ``model`` (timm's ``forward_features``, else ``model(x)``)."""
    if hasattr(model, "forward_features"):
        return model.forward_features(x)
    return model(x)


class _ActOnly(nn.Module):
    """What is left of a timm ``BatchNormAct2d`` once the normalisation is folded away."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x):
        return self.act(self.drop(x))


class ConvAct(nn.Conv2d):
    """Conv2d followed by ReLU / ReLU6 in one oneDNN call (CPU inference), else two calls.

    Writing the activation into the convolution's output saves a full pass over the largest
    activations of the network. With gradients enabled or off the CPU it runs the convolution
    and the activation separately.
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


def _foldable_bn_types() -> tuple:
    types: tuple = (nn.BatchNorm2d,)
    try:
        from timm.layers import BatchNormAct2d

        types = types + (BatchNormAct2d,)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return types


def conv_bn_pairs(
    model: nn.Module, probe: torch.Tensor, *, conv_types=None, bn_types=None
) -> list[tuple[str, str]]:
    """(conv, BatchNorm) name pairs where the BatchNorm's input is the conv's output.

    Found by running ``probe`` through ``model`` and matching each BatchNorm's input to the
    conv that produced it. ``conv_types`` / ``bn_types`` (exact module types) default to the
    2-D ``nn.Conv2d`` and the foldable 2-D BatchNorms; the 3-D networks pass their own.
    """
    types = _foldable_bn_types() if bn_types is None else tuple(bn_types)
    conv_types = (nn.Conv2d,) if conv_types is None else tuple(conv_types)
    produced: list[tuple[torch.Tensor, str]] = []
    pairs: list[tuple[str, str]] = []

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

    convs, bns = [], []
    for name, mod in model.named_modules():
        if type(mod) in conv_types:
            convs.append((mod, conv_hook(name)))
        elif type(mod) in types and mod.track_running_stats and mod.running_mean is not None:
            bns.append((mod, bn_hook(name)))
    try:
        with forward_hooks(convs), forward_hooks(bns, pre=True), torch.no_grad():
            model(probe)
    finally:
        produced.clear()
    return pairs


def fold_batchnorm(
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
    too (:class:`ConvAct`). Convs named in ``keep`` (their own output is wanted) stay as they
    are. The caller verifies the result numerically. ``copy_model=False`` folds ``model``
    itself (for a private copy).

    Returns
    -------
    model : torch.nn.Module
    n_folded : int
    """
    model = (copy.deepcopy(model) if copy_model else model).eval()
    pairs = conv_bn_pairs(model, probe)
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
            setattr(mods[cparent] if cparent else model, cattr, ConvAct(conv, act))
        else:
            new = _ActOnly(bn.drop, bn.act)
        parent, _, attr = bname.rpartition(".")
        setattr(mods[parent] if parent else model, attr, new)
        n += 1
    return model, n


def static_same_padding(model: nn.Module, probe: torch.Tensor) -> tuple[nn.Module, int]:
    """Copy of ``model`` whose timm ``Conv2dSame`` layers become plain convs for ``probe``'s size.

    TensorFlow "same" padding of a strided conv is asymmetric (one more row/column at the
    bottom/right) and timm pads the input tensor on every call, which costs a full copy of the
    activation. For a fixed input size the same result comes from symmetric padding ``P`` and a
    kernel with ``P - before`` leading zero taps: ``out[i] = sum_j w[j] x[s i + j - before]``.

    Returns
    -------
    model : torch.nn.Module
    n_replaced : int
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

    with forward_hooks([(m, size_hook(n)) for n, m in same.items()], pre=True), torch.no_grad():
        model(probe)
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


def cast_deep_layers_bf16(net: nn.Module, reference: nn.Module, n_fp32: int) -> int:
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


class _FinalFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return forward_features(self.net, x)


class InferenceRunner:
    """Inference copy of a backbone: static padding, BatchNorm folded, channels-last, bf16.

    Calling it returns the requested feature maps (float32) of a normalised input batch. Build
    one per exact network state (callers key it by the network's fingerprint) and share it:
    a lock serialises forward passes because the layer hooks write into a shared dict.

    Parameters
    ----------
    model : torch.nn.Module
        The frozen network (not modified).
    layer_modules : list of str
        Modules whose outputs are returned, in order; ``""`` is the final feature map.
    in_chans : int
    size : (int, int)
        Input size, for the probe that finds static paddings and foldable BatchNorms.
    device : torch.device
    precision : {"fp32", "mixed", "bf16", "fp16"}
        ``"mixed"``: the first :data:`MIXED_FP32_LAYERS` transfer layers in float32, the rest
        in bfloat16; ``"bf16"``: pure bfloat16 on the CPU, autocast on CUDA; ``"fp16"``:
        float16 autocast (CUDA only).
    compiled : bool
        Run the final feature map through :func:`torch.compile`.
    """

    backend = "torch"

    def __init__(self, model, *, layer_modules, in_chans, size, device, precision, compiled):
        self.layer_modules = list(layer_modules)
        self.device = device
        self.precision = precision
        self.compiled = compiled
        self.lock = threading.Lock()
        probe = torch.randn(2, in_chans, *size, generator=torch.Generator().manual_seed(0))
        probe = probe.to(device)
        net, n_static = static_same_padding(model, probe)
        fuse = device.type == "cpu" and not compiled and can_fuse_on_cpu()
        net, n_folded = fold_batchnorm(  # net is already a private copy
            net,
            probe,
            fuse_act=fuse,
            keep=tuple(m for m in self.layer_modules if m),
            copy_model=False,
        )
        if n_folded or n_static:
            try:
                with torch.no_grad():
                    ref = forward_features(model, probe)
                    got = forward_features(net, probe)
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
            cast_deep_layers_bf16(net, model, MIXED_FP32_LAYERS)
        self.net = net
        self.micro_batch = CPU_MICRO_BATCH if device.type == "cpu" and not compiled else None
        self.captured: dict[str, torch.Tensor] = {}
        wanted = [m for m in self.layer_modules if m]
        for m in wanted:
            net.get_submodule(m).register_forward_hook(capture_outputs(self.captured, m))
        self.runner = net
        if compiled:
            self.runner = torch.compile(_FinalFeatures(net), options={"freezing": True})
        # when the final map is not needed, the deepest requested layer stops the forward
        self.stop_hook = None
        if wanted and "" not in self.layer_modules:
            order = call_order(net, probe[:1], forward=lambda _, x: self(x))
            last = max(wanted, key=lambda n: order.get(n, -1))
            self.stop_hook = stop_after(net.get_submodule(last))

    def _autocast(self):
        if self.precision in ("bf16", "fp16") and self.device.type == "cuda":
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return torch.autocast(self.device.type, enabled=False)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        self.captured.clear()
        final = None
        with torch.inference_mode(), self._autocast():
            try:
                final = forward_features(self.runner, x)
            except StopForward:
                pass
        maps = [final if m == "" else self.captured.get(m) for m in self.layer_modules]
        self.captured.clear()
        return maps

    def __call__(self, x: torch.Tensor, pad_to: int | None = None) -> list[torch.Tensor | None]:
        """Feature maps (float32, one per entry of ``layer_modules``) of the batch ``x``."""
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
