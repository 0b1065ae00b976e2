"""True 3-D networks from pretrained 2-D backbones: ACS convolutions and I3D inflation.

:func:`convert_to_3d` turns a (pretrained) 2-D timm CNN into a 3-D network that keeps its
ImageNet weights, so that a volume is seen as a volume instead of a stack of slices:

``"acs"`` (Yang et al., "Reinventing 2D convolutions for 3D images", IEEE JBHI 2021)
    The output channels of every ``k x k`` convolution are split into three groups (axial,
    coronal, sagittal; ``C - 2 * (C // 3)``, ``C // 3`` and ``C // 3`` channels) and each
    group's pretrained 2-D kernels are applied in its plane: ``(1, k, k)``, ``(k, 1, k)`` and
    ``(k, k, 1)``. The parameters keep their 2-D shapes (a 2-D state dict loads as it is) and
    the network has exactly as many parameters as the 2-D one.
``"inflate"`` (Carreira & Zisserman, "Quo Vadis, Action Recognition?", CVPR 2017, I3D)
    Every ``k x k`` kernel is repeated ``k`` times along depth and divided by ``k`` (depth
    kernel ``k`` for ``k x k`` kernels, ``1`` for pointwise ones); stride, dilation and padding
    along depth are those of the rows. A volume made of one repeated slice gives the 2-D
    network's activations on that slice, at every depth, up to the depth borders: with
    ``depth_padding="replicate"`` exactly (to rounding), with the default zero padding only in
    the interior.

Both keep every module name, so parameter names, the transfer layers
(:func:`skrtl.get_transfer_layers`: freeze depth and layer-wise learning rates), the stage
decomposition of frozen-prefix caching and BatchNorm re-estimation (AdaBN) work on the 3-D
network as on the 2-D one. The conversions cover the timm EfficientNet (the embedded
``tf_efficientnet_lite0/1/2``, ``efficientnet_b*``, ``tf_efficientnet_*``, MobileNet-style
blocks, squeeze-excitation), ResNet (basic and bottleneck blocks, SE) and ConvNeXt families:
convolutions (depthwise included, TensorFlow "same" padding included), ``BatchNorm2d`` /
``BatchNormAct2d`` (to their 3-D counterparts with the same statistics), ``LayerNorm2d``,
pooling, squeeze-excitation and the classifier heads. A module whose 3-D meaning is not known
raises an error instead of running with 2-D assumptions.

:class:`VolumetricRunner` is the inference copy of a 3-D network (the 2-D fast runner of
:mod:`skrtl._inference` does not apply): ACS kernels materialised, BatchNorm folded into the
convolutions, channels-last-3d memory format and optional bfloat16.
"""

from __future__ import annotations

import copy
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ._backbone import pretrained_backbone
from ._inference import MIXED_FP32_LAYERS, cast_deep_layers_bf16, conv_bn_pairs
from .utils import (
    LRUCache,
    StopForward,
    call_order,
    capture_outputs,
    fingerprint,
    stop_after,
)

__all__ = [
    "VOLUMETRIC_METHODS",
    "ACSConv3d",
    "BatchNormAct3d",
    "InflatedConv3d",
    "LayerNorm3d",
    "SelectAdaptivePool3d",
    "VolumetricRunner",
    "acs_split",
    "convert_to_3d",
    "is_volumetric",
    "pretrained_volumetric_backbone",
]

#: The conversions of :func:`convert_to_3d`.
VOLUMETRIC_METHODS = ("acs", "inflate")
_DEPTH_PADDINGS = ("auto", "zeros", "replicate")


def acs_split(channels: int) -> tuple[int, int, int]:
    """Output channels of the axial, coronal and sagittal groups of an ACS convolution."""
    c = channels // 3
    return channels - 2 * c, c, c


# --------------------------------------------------------------------------------------------
# padding
# --------------------------------------------------------------------------------------------
def _same_pad(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TensorFlow "same" padding (before, after) of one axis."""
    total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _pads(x, kernel, stride, dilation, padding, same, depth_padding):
    """``(x, [(before, after)] * 3)``: the input (depth replicated if asked) and its padding."""
    if same:
        pads = [_same_pad(x.shape[2 + i], kernel[i], stride[i], dilation[i]) for i in range(3)]
    else:
        pads = [(p, p) for p in padding]
    if depth_padding == "replicate" and pads[0] != (0, 0):
        x = F.pad(x, (0, 0, 0, 0, *pads[0]), mode="replicate")
        pads[0] = (0, 0)
    return x, pads


def _used_taps(size: int, k: int, s: int, before: int, after: int) -> tuple[int, int, int, int]:
    """Kernel taps ``[lo, hi]`` of one axis that read the input (not only padding).

    Returns ``(lo, hi, before', after')``: the padding of the cropped kernel that gives the
    same output. On the small grids of deep layers (e.g. 2 x 2 x 2 maps and 5 x 5 x 5
    kernels) most taps read padding only; cropping them makes the convolution (and its
    backward pass) proportionally cheaper and changes nothing else.
    """
    n_out = (size + before + after - k) // s + 1
    used = []
    for t in range(k):
        lo_b = max(0, before - t)
        hi_b = min(s * (n_out - 1), size - 1 + before - t)
        if -(-lo_b // s) * s <= hi_b:
            used.append(t)
    if not used:  # pragma: no cover - only padding is read (degenerate sizes)
        return 0, k - 1, before, after
    lo, hi = used[0], used[-1]
    before2 = before - lo
    after2 = (n_out - 1) * s + (hi - lo + 1) - size - before2
    return lo, hi, before2, after2


def _crop_plan(x, kernel, stride, dilation, pads):
    """Per axis ``(lo, hi)`` taps and the new padding (no cropping with dilation)."""
    if tuple(dilation) != (1, 1, 1):
        return [(0, k - 1) for k in kernel], pads
    plan = [_used_taps(x.shape[2 + i], kernel[i], stride[i], *pads[i]) for i in range(3)]
    return [(lo, hi) for lo, hi, _, _ in plan], [(b, a) for _, _, b, a in plan]


def _crop(weight, taps):
    (a0, b0), (a1, b1), (a2, b2) = taps
    return weight[:, :, a0 : b0 + 1, a1 : b1 + 1, a2 : b2 + 1]


def _pad(x, pads):
    """Zero padding (negative values crop) of the three spatial axes."""
    if all(p == (0, 0) for p in pads):
        return x
    return F.pad(x, (*pads[2], *pads[1], *pads[0]))


def _conv3d(x, weight, bias, stride, padding, dilation, groups, same, depth_padding):
    """3-D convolution with symmetric or TF "same" padding, zeros or replicated along depth.

    Kernel taps that only read padding are cropped (:func:`_used_taps`).
    """
    kernel = tuple(weight.shape[2:])
    x, pads = _pads(x, kernel, stride, dilation, padding, same, depth_padding)
    taps, pads = _crop_plan(x, kernel, stride, dilation, pads)
    weight = _crop(weight, taps)
    if all(a == b and a >= 0 for a, b in pads):
        return F.conv3d(x, weight, bias, stride, tuple(a for a, _ in pads), dilation, groups)
    return F.conv3d(_pad(x, pads), weight, bias, stride, 0, dilation, groups)


def _depthwise_training(conv, x) -> bool:
    """Whether a depthwise conv should use the fast-backward path (training on the CPU)."""
    return (
        torch.is_grad_enabled()
        and x.device.type == "cpu"
        and conv.groups == conv.in_channels == conv.out_channels
        and conv.weight.shape[-1] > 1
        and set(conv.dilation) == {1}
        and (x.requires_grad or conv.weight.requires_grad)
    )


def _planes_training(conv, x) -> bool:
    """Whether an ACS conv should run as three batched 2-D convolutions (training, CPU)."""
    return (
        torch.is_grad_enabled()
        and x.device.type == "cpu"
        and conv.weight.shape[-1] > 1
        and set(conv.dilation) == {1}
        and (conv.groups == 1 or conv.groups == conv.in_channels == conv.out_channels)
        and (x.requires_grad or conv.weight.requires_grad)
    )


def _acs_planes_conv3d(conv, x):
    """ACS convolution as three batched 2-D convolutions, one per plane group.

    Each group's input is cut into the slices its kernel acts on (axial: depth slices,
    coronal: rows, sagittal: columns), which are batched through one 2-D convolution (forward
    and backward are oneDNN's fast 2-D kernels; the dense ``k x k x k`` kernel would spend
    ``k`` times the work on zeros, and the 3-D depthwise backward pass is slow). Slices are
    taken at the kernel centre of the dense kernel, so the result equals
    :meth:`ACSConv3d.forward`, with any stride and with TensorFlow "same" padding.
    """
    k = conv.weight.shape[-1]
    c = k // 2
    kernel = (k, k, k)
    x, pads = _pads(
        x, kernel, conv.stride, conv.dilation, conv.padding, conv.same, conv.depth_padding
    )
    xp = _pad(x, pads)
    n, _, dp, hp, wp = xp.shape
    sd, sh, sw = conv.stride
    od, oh, ow = ((size - k) // st + 1 for size, st in zip((dp, hp, wp), conv.stride))
    a, b, _ = conv.split
    w = conv.weight
    bias = conv.bias
    depthwise = conv.groups != 1
    cl = torch.channels_last

    def inputs(lo, hi):
        return xp[:, lo:hi] if depthwise else xp

    def part(lo, hi):
        return (w[lo:hi], None if bias is None else bias[lo:hi], hi - lo if depthwise else 1)

    outs = []
    # axial: depth slices (H, W)
    wa, ba, ga = part(0, a)
    xa = inputs(0, a)[:, :, c : c + (od - 1) * sd + 1 : sd]
    xa = xa.permute(0, 2, 1, 3, 4).reshape(n * od, -1, hp, wp).contiguous(memory_format=cl)
    ya = F.conv2d(xa, wa, ba, (sh, sw), 0, 1, ga)
    outs.append(ya.reshape(n, od, a, oh, ow).permute(0, 2, 1, 3, 4))
    # coronal: rows (D, W)
    if b:
        wb, bb, gb = part(a, a + b)
        xb = inputs(a, a + b)[:, :, :, c : c + (oh - 1) * sh + 1 : sh]
        xb = xb.permute(0, 3, 1, 2, 4).reshape(n * oh, -1, dp, wp).contiguous(memory_format=cl)
        yb = F.conv2d(xb, wb, bb, (sd, sw), 0, 1, gb)
        outs.append(yb.reshape(n, oh, b, od, ow).permute(0, 2, 3, 1, 4))
        # sagittal: columns (D, H)
        cc = conv.out_channels - a - b
        wc, bc, gc = part(a + b, conv.out_channels)
        xc = inputs(a + b, conv.out_channels)[:, :, :, :, c : c + (ow - 1) * sw + 1 : sw]
        xc = xc.permute(0, 4, 1, 2, 3).reshape(n * ow, -1, dp, hp).contiguous(memory_format=cl)
        yc = F.conv2d(xc, wc, bc, (sd, sh), 0, 1, gc)
        outs.append(yc.reshape(n, ow, cc, od, oh).permute(0, 2, 3, 4, 1))
    out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
    return out.contiguous(memory_format=torch.channels_last_3d)


def _depthwise_conv3d(conv, x, split):
    """Training forward of a depthwise conv through :class:`_DepthwiseConv3d`."""
    k = conv.weight.shape[-1]
    kernel = (k, k, k)
    x, pads = _pads(
        x, kernel, conv.stride, conv.dilation, conv.padding, conv.same, conv.depth_padding
    )
    taps, pads = _crop_plan(x, kernel, conv.stride, conv.dilation, pads)
    return _DepthwiseConv3d.apply(
        _pad(x, pads), conv.weight, conv.bias, tuple(conv.stride), split, tuple(taps)
    )


class _DepthwiseConv3d(torch.autograd.Function):
    """Depthwise 3-D convolution of a padded input with a backward pass built from fast ops.

    oneDNN's depthwise 3-D convolution is fast forward, but its backward pass on CPUs is one
    to three orders of magnitude slower than the forward pass. Here the input gradient is a
    (fast) forward depthwise convolution of the zero-inserted output gradient with the flipped
    kernel, and the weight gradient is a sum over output positions per kernel tap. With an ACS
    ``split`` the weight is 2-D ``(C, 1, k, k)`` and only the ``k * k`` taps of each channel's
    plane are computed; otherwise the weight is ``(C, 1, k, k, k)``. ``taps`` are the used
    taps per axis (the input is padded for them).

    Under autocast (``precision="bf16"``) the forward convolution runs in the autocast dtype,
    and the backward pass, which runs outside autocast, computes in the output gradient's
    dtype and returns every gradient in the dtype of its input.
    """

    @staticmethod
    def forward(ctx, xp, weight, bias, stride, split, taps):
        w3 = _crop(_acs_kernel(weight, split) if split is not None else weight, taps)
        if xp.is_contiguous(memory_format=torch.channels_last_3d):
            w3 = w3.contiguous(memory_format=torch.channels_last_3d)
        ctx.save_for_backward(xp, weight)
        ctx.stride, ctx.split, ctx.taps = stride, split, taps
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.conv3d(xp, w3, bias, stride, 0, 1, xp.shape[1])

    @staticmethod
    def backward(ctx, go):
        xp, weight = ctx.saved_tensors
        stride, split, taps = ctx.stride, ctx.split, ctx.taps
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            w3 = _crop(_acs_kernel(weight, split) if split is not None else weight, taps)
            ks = w3.shape[2:]
            g = go
            if any(st > 1 for st in stride):
                size = [(o - 1) * st + 1 for o, st in zip(go.shape[2:], stride)]
                g = go.new_zeros((*go.shape[:2], *size))
                g[:, :, :: stride[0], :: stride[1], :: stride[2]] = go
            if go.is_contiguous(memory_format=torch.channels_last_3d):
                g = g.contiguous(memory_format=torch.channels_last_3d)
            wf = w3.flip(2, 3, 4).to(g.dtype).contiguous(memory_format=torch.channels_last_3d)
            gx = F.conv3d(g, wf, None, 1, tuple(k - 1 for k in ks), 1, xp.shape[1])
            rest = [xp.shape[2 + i] - gx.shape[2 + i] for i in range(3)]
            if any(rest):
                gx = F.pad(gx, (0, rest[2], 0, rest[1], 0, rest[0]))
            gx = gx.to(xp.dtype)
        if ctx.needs_input_grad[1]:
            gw = _tap_gradients(xp, go, stride, weight, split, taps).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            acc = torch.promote_types(go.dtype, torch.float32)  # bf16 sums in float32
            gb = go.sum((0, 2, 3, 4), dtype=acc).to(ctx.bias_dtype)
        return gx, gw, gb, None, None, None


def _tap_gradients(xp, go, stride, weight, split, taps):
    """Weight gradient of a depthwise conv, tap by tap: ``sum(go * shifted input)``."""
    out = go.shape[2:]
    dims = (0, 2, 3, 4)
    gw = torch.zeros_like(weight)
    (lo0, hi0), (lo1, hi1), (lo2, hi2) = taps

    def tap_grad(g, x, i, j, l):
        # tap (i, j, l) of the full kernel reads the cropped input from (i - lo0, ...)
        i, j, l = i - lo0, j - lo1, l - lo2
        window = x[
            :,
            :,
            i : i + (out[0] - 1) * stride[0] + 1 : stride[0],
            j : j + (out[1] - 1) * stride[1] + 1 : stride[1],
            l : l + (out[2] - 1) * stride[2] + 1 : stride[2],
        ]
        return (g * window).sum(dims)

    if split is None:
        # all taps at once: per channel, the correlation of the input with the output
        # gradient (channels as groups, samples as the input channels, stride as dilation)
        n, c = xp.shape[:2]
        inp = xp.transpose(0, 1).reshape(1, c * n, *xp.shape[2:])
        wt = go.transpose(0, 1).reshape(c, n, *out)
        g = F.conv3d(inp, wt.to(inp.dtype), None, 1, 0, tuple(stride), c)
        gw[:, 0, lo0 : hi0 + 1, lo1 : hi1 + 1, lo2 : hi2 + 1] = g[
            0, :, : hi0 - lo0 + 1, : hi1 - lo1 + 1, : hi2 - lo2 + 1
        ].to(gw.dtype)
        return gw
    k = weight.shape[-1]
    c = k // 2
    a, b, _ = split
    groups = (  # channels, the 3-D tap of 2-D tap (i, j), and the used 2-D taps
        (slice(0, a), lambda i, j: (c, i, j), (lo0 <= c <= hi0), (lo1, hi1), (lo2, hi2)),
        (slice(a, a + b), lambda i, j: (i, c, j), (lo1 <= c <= hi1), (lo0, hi0), (lo2, hi2)),
        (slice(a + b, None), lambda i, j: (i, j, c), (lo2 <= c <= hi2), (lo0, hi0), (lo1, hi1)),
    )
    for chans, tap, plane_used, (r0, r1), (q0, q1) in groups:
        g, x = go[:, chans], xp[:, chans]
        if g.shape[1] == 0 or not plane_used:
            continue
        for i in range(r0, r1 + 1):
            for j in range(q0, q1 + 1):
                gw[chans, 0, i, j] = tap_grad(g, x, *tap(i, j))
    return gw


def _acs_kernel(w: torch.Tensor, split) -> torch.Tensor:
    """Dense ``k x k x k`` kernel of ACS 2-D kernels (``split``: axial, coronal, sagittal)."""
    k = w.shape[-1]
    c = k // 2
    a, b, _ = split
    axial = F.pad(w[:a].unsqueeze(2), (0, 0, 0, 0, c, k - 1 - c))
    coronal = F.pad(w[a : a + b].unsqueeze(3), (0, 0, c, k - 1 - c))
    sagittal = F.pad(w[a + b :].unsqueeze(4), (c, k - 1 - c))
    return torch.cat([axial, coronal, sagittal])


def _triple(v) -> tuple[int, int, int]:
    """A 2-D (rows, cols) setting as (depth, rows, cols): depth takes the rows' value."""
    v = tuple(v) if isinstance(v, tuple | list) else (v, v)
    return (int(v[0]), int(v[0]), int(v[1]))


# --------------------------------------------------------------------------------------------
# 3-D layers
# --------------------------------------------------------------------------------------------
class ACSConv3d(nn.Module):
    """A 2-D convolution applied to volumes in the axial, coronal and sagittal planes.

    The weight keeps its 2-D shape ``(C_out, C_in / groups, k, k)``; output channels
    ``[0, a)`` apply their kernel in the axial plane ``(H, W)``, ``[a, a + c)`` in the coronal
    plane ``(D, W)`` and the rest in the sagittal plane ``(D, H)`` (:func:`acs_split`). The
    three kernels are embedded in one ``k x k x k`` kernel (zeros off their plane), so every
    group samples the same grid (also with strides and TensorFlow "same" padding) and one
    3-D convolution computes all groups, faster on CPUs than three thin ones. Pointwise
    (``1 x 1``) convolutions are ``1 x 1 x 1`` convolutions.

    Parameters
    ----------
    conv : torch.nn.Conv2d
        The 2-D convolution (timm's ``Conv2dSame`` included); its weight is shared, not copied.
    same : bool
        TensorFlow "same" padding computed from the input size (timm's ``Conv2dSame``).
    depth_padding : {"zeros", "replicate"}
    """

    def __init__(self, conv: nn.Conv2d, *, same: bool, padding=None, depth_padding="zeros"):
        super().__init__()
        kh, kw = conv.kernel_size
        if kh != kw:
            raise ValueError(
                f"ACS needs square kernels, got kernel_size={conv.kernel_size!r}; use "
                "method='inflate' for this network."
            )
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = (kh, kh, kh)
        self.stride = _triple(conv.stride)
        self.dilation = _triple(conv.dilation)
        self.padding = (0, 0, 0) if same else _triple(conv.padding if padding is None else padding)
        self.groups = conv.groups
        self.same = bool(same)
        self.depth_padding = depth_padding
        self.split = acs_split(conv.out_channels)
        self.weight = conv.weight
        self.bias = conv.bias

    def kernel3d(self) -> torch.Tensor:
        """The dense ``(C_out, C_in / groups, k, k, k)`` kernel of the three plane groups."""
        if self.weight.shape[-1] == 1:
            return self.weight.unsqueeze(2)
        return _acs_kernel(self.weight, self.split)

    def forward(self, x):
        if _planes_training(self, x):
            return _acs_planes_conv3d(self, x)
        if _depthwise_training(self, x):
            return _depthwise_conv3d(self, x, self.split)
        w = self.kernel3d()
        if x.is_contiguous(memory_format=torch.channels_last_3d):
            w = w.contiguous(memory_format=torch.channels_last_3d)
        return _conv3d(
            x,
            w,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.same,
            self.depth_padding,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={'same' if self.same else self.padding}, "
            f"groups={self.groups}, split={self.split}"
        )


class InflatedConv3d(nn.Conv3d):
    """``nn.Conv3d`` with TensorFlow "same" padding and zero or replicated depth padding.

    :meth:`inflate` builds it from a 2-D convolution (I3D inflation); :class:`VolumetricRunner`
    also uses it for the materialised kernels of ACS convolutions.
    """

    def __init__(self, *args, same: bool = False, depth_padding: str = "zeros", **kwargs):
        super().__init__(*args, **kwargs)
        self.same = bool(same)
        self.depth_padding = depth_padding

    @classmethod
    def inflate(cls, conv: nn.Conv2d, *, same: bool, padding=None, depth_padding="zeros"):
        """The inflated copy of ``conv``: kernel repeated ``k`` times along depth, divided by k."""
        kd = int(conv.kernel_size[0])
        padding = conv.padding if padding is None else padding
        new = cls(
            conv.in_channels,
            conv.out_channels,
            (kd, *conv.kernel_size),
            stride=_triple(conv.stride),
            padding=(0, 0, 0) if same else _triple(padding),
            dilation=_triple(conv.dilation),
            groups=conv.groups,
            bias=conv.bias is not None,
            same=same,
            depth_padding=depth_padding,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(conv.weight.unsqueeze(2).expand_as(new.weight) / kd)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        new.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            new.bias.requires_grad_(conv.bias.requires_grad)
        return new

    def forward(self, x):
        if _depthwise_training(self, x):
            return _depthwise_conv3d(self, x, None)
        return _conv3d(
            x,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.same,
            self.depth_padding,
        )


class BatchNormAct3d(nn.BatchNorm3d):
    """``BatchNorm3d`` followed by dropout and an activation (timm's ``BatchNormAct2d`` in 3-D).

    The children keep timm's names (``drop``, ``act``) and the statistics are those of the
    2-D layer it replaces (:meth:`from_2d`).
    """

    def __init__(self, num_features, *, drop=None, act=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    @classmethod
    def from_2d(cls, bn: nn.Module):
        new = cls(
            bn.num_features,
            drop=getattr(bn, "drop", None),
            act=getattr(bn, "act", None),
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            device=_device_of(bn),
        )
        _copy_bn(bn, new)
        return new

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def _copy_bn(src: nn.Module, dst: nn.Module) -> None:
    """Share the affine parameters and copy the running statistics of ``src`` into ``dst``."""
    if src.affine:
        dst.weight = src.weight
        dst.bias = src.bias
    if src.track_running_stats and src.running_mean is not None:
        with torch.no_grad():
            dst.running_mean.copy_(src.running_mean)
            dst.running_var.copy_(src.running_var)
            dst.num_batches_tracked.copy_(src.num_batches_tracked)


def _bn3d(bn: nn.BatchNorm2d, ctx) -> nn.BatchNorm3d:
    new = nn.BatchNorm3d(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=_device_of(bn),
    )
    _copy_bn(bn, new)
    new.train(bn.training)
    return new


def _device_of(module: nn.Module):
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


class LayerNorm3d(nn.LayerNorm):
    """LayerNorm over the channels of ``(N, C, D, H, W)`` volumes (timm's ``LayerNorm2d``)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 4, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 4, 1, 2, 3)


class SelectAdaptivePool3d(nn.Module):
    """Global pooling of volumes (timm's ``SelectAdaptivePool2d``): avg, max, avgmax, catavgmax.

    Without ``flatten`` the output is ``(N, C, 1, 1, 1)``.
    """

    def __init__(self, pool_type: str = "avg", flatten: bool = False):
        super().__init__()
        pool_type = (pool_type or "").lower()
        if pool_type.startswith("fast"):
            pool_type = pool_type[4:] or "avg"
        if pool_type not in ("", "avg", "max", "avgmax", "catavgmax"):
            raise ValueError(f"unknown global pool_type {pool_type!r}.")
        self.pool_type = pool_type
        self.flatten = bool(flatten)

    def is_identity(self) -> bool:
        return not self.pool_type

    def feat_mult(self) -> int:
        return 2 if self.pool_type == "catavgmax" else 1

    def forward(self, x):
        if not self.pool_type:
            return x.flatten(1) if self.flatten else x
        dims = (2, 3, 4)
        if self.pool_type == "avg":
            out = x.mean(dims, keepdim=True)
        elif self.pool_type == "max":
            out = x.amax(dims, keepdim=True)
        elif self.pool_type == "avgmax":
            out = 0.5 * (x.mean(dims, keepdim=True) + x.amax(dims, keepdim=True))
        else:
            out = torch.cat([x.mean(dims, keepdim=True), x.amax(dims, keepdim=True)], 1)
        return out.flatten(1) if self.flatten else out

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}, flatten={self.flatten}"


class _MaxPool3dSame(nn.MaxPool3d):
    """Max pooling with TensorFlow "same" padding (timm's ``MaxPool2dSame`` in 3-D)."""

    def forward(self, x):
        k, s, d = (_as3(v) for v in (self.kernel_size, self.stride, self.dilation))
        pads = [_same_pad(x.shape[2 + i], k[i], s[i], d[i]) for i in range(3)]
        x = F.pad(x, (*pads[2], *pads[1], *pads[0]), value=-float("inf"))
        return F.max_pool3d(x, k, s, 0, d, self.ceil_mode)


def _as3(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, tuple | list) else (v, v, v)


class _SqueezeExcite3d(nn.Module):
    """timm EfficientNet squeeze-excitation (``conv_reduce``, ``act1``, ``conv_expand``)."""

    def __init__(self, se: nn.Module):
        super().__init__()
        self.conv_reduce = se.conv_reduce
        self.act1 = se.act1
        self.conv_expand = se.conv_expand
        self.gate = se.gate

    def forward(self, x):
        s = x.mean((2, 3, 4), keepdim=True)
        s = self.conv_expand(self.act1(self.conv_reduce(s)))
        return x * self.gate(s)


class _SEModule3d(nn.Module):
    """timm ``SEModule`` (ResNet SE) on volumes (``fc1``, ``bn``, ``act``, ``fc2``)."""

    def __init__(self, se: nn.Module):
        super().__init__()
        self.add_maxpool = bool(getattr(se, "add_maxpool", False))
        self.fc1 = se.fc1
        self.bn = se.bn
        self.act = se.act
        self.fc2 = se.fc2
        self.gate = se.gate

    def forward(self, x):
        s = x.mean((2, 3, 4), keepdim=True)
        if self.add_maxpool:
            s = 0.5 * s + 0.5 * x.amax((2, 3, 4), keepdim=True)
        s = self.fc2(self.act(self.bn(self.fc1(s))))
        return x * self.gate(s)


class _EffectiveSE3d(nn.Module):
    """timm ``EffectiveSEModule`` on volumes (``fc``, ``gate``)."""

    def __init__(self, se: nn.Module):
        super().__init__()
        self.add_maxpool = bool(getattr(se, "add_maxpool", False))
        self.fc = se.fc
        self.gate = se.gate

    def forward(self, x):
        s = x.mean((2, 3, 4), keepdim=True)
        if self.add_maxpool:
            s = 0.5 * s + 0.5 * x.amax((2, 3, 4), keepdim=True)
        return x * self.gate(self.fc(s))


class _ConvNeXtBlock3d(nn.Module):
    """timm ``ConvNeXtBlock`` on volumes (the channels-last LayerNorm / MLP permutes in 3-D)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.use_conv_mlp = bool(block.use_conv_mlp)
        self.conv_dw = block.conv_dw
        self.norm = block.norm
        self.mlp = block.mlp
        self.gamma = block.gamma
        self.shortcut = block.shortcut
        self.drop_path = block.drop_path

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = x.permute(0, 2, 3, 4, 1)
            x = self.mlp(self.norm(x))
            x = x.permute(0, 4, 1, 2, 3)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1, 1))
        return self.drop_path(x) + self.shortcut(shortcut)


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------
def _timm_types() -> dict[str, type]:
    """timm classes by short name (those of this timm version only)."""
    import importlib

    where = {
        "timm.layers": (
            "Conv2dSame",
            "BatchNormAct2d",
            "LayerNorm2d",
            "SelectAdaptivePool2d",
            "MaxPool2dSame",
            "DropPath",
            "Mlp",
            "NormMlpClassifierHead",
            "ClassifierHead",
            "SEModule",
            "EffectiveSEModule",
            "Linear",
        ),
        "timm.models.efficientnet": ("EfficientNet",),
        "timm.models._efficientnet_blocks": (
            "SqueezeExcite",
            "DepthwiseSeparableConv",
            "InvertedResidual",
            "EdgeResidual",
            "ConvBnAct",
        ),
        "timm.models.resnet": ("ResNet", "BasicBlock", "Bottleneck"),
        "timm.models.convnext": ("ConvNeXt", "ConvNeXtStage", "ConvNeXtBlock", "Downsample"),
        "timm.models.mobilenetv3": ("MobileNetV3",),
    }
    out = {}
    for module, names in where.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:  # pragma: no cover - timm layout of other versions
            continue
        for name in names:
            cls = getattr(mod, name, None)
            if isinstance(cls, type):
                out.setdefault(name, cls)
    return out


# containers and blocks whose forward only composes their children (no 2-D assumption)
_AGNOSTIC_TIMM = (
    "EfficientNet",
    "MobileNetV3",
    "DepthwiseSeparableConv",
    "InvertedResidual",
    "EdgeResidual",
    "ConvBnAct",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "ConvNeXt",
    "ConvNeXtStage",
    "Downsample",
    "Mlp",
    "NormMlpClassifierHead",
    "ClassifierHead",
    "DropPath",
    "Linear",
)
_AGNOSTIC_TORCH = (
    nn.Sequential,
    nn.ModuleList,
    nn.ModuleDict,
    nn.Identity,
    nn.Linear,
    nn.Flatten,
    nn.Dropout,
    nn.LayerNorm,
)


def _elementwise(cls: type) -> bool:
    """Activation modules (elementwise, any tensor rank)."""
    if cls.__module__ == "torch.nn.modules.activation":
        return cls.__name__ not in (
            "Softmax",
            "Softmax2d",
            "Softmin",
            "LogSoftmax",
            "MultiheadAttention",
            "GLU",
        )
    return cls.__module__.startswith("timm.layers.activations") and cls.__name__ != "GLU"


class _Ctx:
    def __init__(self, method: str, depth_padding: str):
        self.method = method
        self.depth_padding = depth_padding
        self.types = _timm_types()

    def is_(self, module, name: str) -> bool:
        cls = self.types.get(name)
        return cls is not None and type(module) is cls


def _convert_conv(conv: nn.Conv2d, ctx: _Ctx, same: bool) -> nn.Module:
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"convert_to_3d: convolutions with padding_mode={conv.padding_mode!r} are not "
            "supported (only zero padding)."
        )
    padding = conv.padding
    if isinstance(padding, str):  # torch's padding="same" / "valid" (stride 1)
        same, padding = padding == "same", (0, 0)
    kw = {"same": same, "padding": padding, "depth_padding": ctx.depth_padding}
    if ctx.method == "acs":
        new: nn.Module = ACSConv3d(conv, **kw)
    else:
        new = InflatedConv3d.inflate(conv, **kw)
    new.train(conv.training)
    return new


def _convert_pool(pool: nn.Module, same: bool) -> nn.Module:
    k = _triple(pool.kernel_size)
    s = _triple(pool.stride)
    if isinstance(pool, nn.MaxPool2d):
        cls = _MaxPool3dSame if same else nn.MaxPool3d
        return cls(
            k,
            s,
            0 if same else _triple(pool.padding),
            _triple(pool.dilation),
            ceil_mode=pool.ceil_mode,
        )
    return nn.AvgPool3d(
        k,
        s,
        _triple(pool.padding),
        ceil_mode=pool.ceil_mode,
        count_include_pad=pool.count_include_pad,
        divisor_override=pool.divisor_override,
    )


def _convert(module: nn.Module, ctx: _Ctx, name: str) -> nn.Module:
    cls = type(module)
    if ctx.is_(module, "Conv2dSame"):
        return _convert_conv(module, ctx, same=True)
    if cls is nn.Conv2d:
        return _convert_conv(module, ctx, same=False)
    if cls is nn.BatchNorm2d:
        return _bn3d(module, ctx)
    if ctx.is_(module, "BatchNormAct2d"):
        new = BatchNormAct3d.from_2d(module)
        new.train(module.training)
        new.drop = _convert(new.drop, ctx, f"{name}.drop")
        new.act = _convert(new.act, ctx, f"{name}.act")
        return new
    if ctx.is_(module, "LayerNorm2d"):
        new = LayerNorm3d(
            module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine
        )
        if module.elementwise_affine:
            new.weight = module.weight
            new.bias = module.bias
        return new
    if ctx.is_(module, "SelectAdaptivePool2d"):
        flatten = isinstance(module.flatten, nn.Flatten) or bool(
            getattr(module.pool, "flatten", False)
        )
        return SelectAdaptivePool3d(module.pool_type, flatten=flatten)
    if cls is nn.AdaptiveAvgPool2d and _is_global(module.output_size):
        return SelectAdaptivePool3d("avg")
    if cls is nn.AdaptiveMaxPool2d and _is_global(module.output_size):
        return SelectAdaptivePool3d("max")
    if cls in (nn.MaxPool2d, nn.AvgPool2d):
        return _convert_pool(module, same=False)
    if ctx.is_(module, "MaxPool2dSame"):
        return _convert_pool(module, same=True)
    if ctx.is_(module, "SqueezeExcite") and hasattr(module, "conv_reduce"):
        new = _SqueezeExcite3d(module)
    elif ctx.is_(module, "SEModule"):
        new = _SEModule3d(module)
    elif ctx.is_(module, "EffectiveSEModule"):
        new = _EffectiveSE3d(module)
    elif ctx.is_(module, "ConvNeXtBlock"):
        new = _ConvNeXtBlock3d(module)
    elif (
        cls in _AGNOSTIC_TORCH
        or _elementwise(cls)
        or any(ctx.is_(module, n) for n in _AGNOSTIC_TIMM)
    ):
        new = module
    else:
        raise ValueError(
            f"convert_to_3d: no 3-D counterpart is known for module {name or '<root>'!r} of "
            f"type {cls.__module__}.{cls.__qualname__}; supported are the timm EfficientNet, "
            "ResNet and ConvNeXt families (convolutions, BatchNorm, LayerNorm2d, pooling, "
            "squeeze-excitation, their blocks and heads)."
        )
    new.train(module.training)
    for child_name, child in list(new.named_children()):
        converted = _convert(child, ctx, f"{name}.{child_name}" if name else child_name)
        if converted is not child:
            setattr(new, child_name, converted)
    return new


def _is_global(output_size) -> bool:
    sizes = output_size if isinstance(output_size, tuple | list) else (output_size,)
    return all(s == 1 for s in sizes)


def convert_to_3d(
    model: nn.Module,
    method: str = "acs",
    *,
    depth_padding: str = "auto",
    copy_model: bool = True,
) -> nn.Module:
    """A 3-D network with the weights of a 2-D timm CNN (ACS convolutions or I3D inflation).

    Parameters
    ----------
    model : torch.nn.Module
        A 2-D timm CNN of the EfficientNet (lite0/1/2 included), ResNet or ConvNeXt family,
        pretrained or not, with or without its classifier.
    method : {"acs", "inflate"}, default="acs"
        ``"acs"``: each convolution's output channels split into axial, coronal and sagittal
        groups whose 2-D kernels act in their plane (the parameters keep their 2-D shapes).
        ``"inflate"``: every ``k x k`` kernel repeated ``k`` times along depth and divided by
        ``k`` (``1 x 1`` kernels stay pointwise). See the module docstring.
    depth_padding : {"auto", "zeros", "replicate"}, default="auto"
        Padding of the convolutions along depth. ``"replicate"`` (the ``"auto"`` choice for
        ``"inflate"``) repeats the border slices: an inflated network then gives a volume of
        one repeated slice exactly the 2-D network's activations (the inflation identity),
        and the activations of small deep feature maps keep their 2-D scale (with zero
        padding, the depth-averaged kernels of small maps read mostly zeros and the
        activations fade). ``"zeros"`` (the ``"auto"`` choice for ``"acs"``, whose kernels are
        each a 2-D kernel with the 2-D network's zero padding in its plane).
    copy_model : bool, default=True
        Convert a deep copy (the 2-D model is untouched); ``False`` converts ``model`` itself
        (its parameters become the 3-D network's).

    Returns
    -------
    torch.nn.Module
        The same timm model class with 3-D modules, taking ``(N, C, D, H, W)`` volumes. Every
        module keeps its name, so ``named_parameters`` names, the transfer layers
        (:func:`skrtl.get_transfer_layers`) and the BatchNorm layers are those of the 2-D
        network; the train / eval mode and ``requires_grad`` flags are kept.

    Raises
    ------
    ValueError
        For an unknown ``method`` / ``depth_padding``, or a module whose 3-D meaning is not
        known (the network is then outside the supported families).

    Examples
    --------
    >>> import torch
    >>> from skrtl import load_backbone
    >>> from skrtl._volumetric import convert_to_3d
    >>> net = convert_to_3d(load_backbone(pretrained=False), "acs")
    >>> net(torch.zeros(1, 3, 32, 32, 32)).shape
    torch.Size([1, 1280])
    """
    if method not in VOLUMETRIC_METHODS:
        raise ValueError(f"method must be one of {VOLUMETRIC_METHODS!r}, got {method!r}.")
    if depth_padding not in _DEPTH_PADDINGS:
        raise ValueError(
            f"depth_padding must be one of {_DEPTH_PADDINGS!r}, got {depth_padding!r}."
        )
    if is_volumetric(model):
        raise ValueError("convert_to_3d: the model is already a 3-D network.")
    if depth_padding == "auto":
        depth_padding = "replicate" if method == "inflate" else "zeros"
    model = copy.deepcopy(model) if copy_model else model
    ctx = _Ctx(method, depth_padding)
    out = _convert(model, ctx, "")
    out.skrtl_volumetric = method
    return out


def is_volumetric(model: nn.Module) -> bool:
    """Whether ``model`` is a 3-D network made by :func:`convert_to_3d`."""
    return getattr(model, "skrtl_volumetric", None) in VOLUMETRIC_METHODS


# key (name, weights, pretrained, in_chans, device, method) -> (model, fingerprint, memo dict)
_VOLUME_MODEL_CACHE = LRUCache(2)


def pretrained_volumetric_backbone(
    name: str, weights, pretrained: bool, in_chans: int, device, method: str
) -> tuple[nn.Module, str, dict]:
    """The frozen 3-D network of a pretrained backbone, its fingerprint and a memo dict.

    The 3-D counterpart of :func:`~skrtl._backbone.pretrained_backbone`: converted once per
    process and *shared* by every estimator fitted with the same arguments (do not modify it
    in place; estimators that change it, e.g. through AdaBN, copy it first).
    """
    key = (
        name,
        None if weights is None else str(weights),
        bool(pretrained),
        int(in_chans),
        str(device),
        method,
    )
    hit = _VOLUME_MODEL_CACHE.get(key)
    if hit is None:
        model2d, _, _ = pretrained_backbone(name, weights, pretrained, in_chans, device)
        model = convert_to_3d(model2d, method).eval()
        model.requires_grad_(False)
        hit = (model, fingerprint(model), {})
        _VOLUME_MODEL_CACHE.put(key, hit)
    return hit


# --------------------------------------------------------------------------------------------
# inference copy
# --------------------------------------------------------------------------------------------
def _materialise(net: nn.Module) -> int:
    """Replace every ACS convolution of ``net`` by an equivalent dense ``InflatedConv3d``."""
    n = 0
    for name, mod in list(net.named_modules()):
        if type(mod) is not ACSConv3d:
            continue
        w = mod.kernel3d().detach()
        new = InflatedConv3d(
            mod.in_channels,
            mod.out_channels,
            tuple(w.shape[2:]),
            stride=mod.stride,
            padding=mod.padding,
            dilation=mod.dilation,
            groups=mod.groups,
            bias=mod.bias is not None,
            same=mod.same,
            depth_padding=mod.depth_padding,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(w)
            if mod.bias is not None:
                new.bias.copy_(mod.bias)
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, attr, new)
        n += 1
    return n


_BN3D_TYPES = (nn.BatchNorm3d, BatchNormAct3d)


def _fold_bn3d(net: nn.Module, probe: torch.Tensor, keep=()) -> int:
    """Fold every BatchNorm3d whose input is the output of a 3-D conv into that conv."""
    pairs = conv_bn_pairs(net, probe, conv_types=(nn.Conv3d,), bn_types=_BN3D_TYPES)
    uses: dict[str, int] = {}
    for cname, _ in pairs:
        uses[cname] = uses.get(cname, 0) + 1
    mods = dict(net.named_modules())
    n = 0
    for cname, bname in pairs:
        if uses[cname] != 1 or cname in keep:
            continue
        conv, bn = mods[cname], mods[bname]
        with torch.no_grad():
            inv = torch.rsqrt(bn.running_var + bn.eps)
            scale = bn.weight * inv if bn.affine else inv
            shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
            conv.weight.mul_(scale.view(-1, 1, 1, 1, 1).to(conv.weight.dtype))
            bias = shift if conv.bias is None else conv.bias * scale + shift
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        new = nn.Sequential(bn.drop, bn.act) if type(bn) is BatchNormAct3d else nn.Identity()
        parent, _, attr = bname.rpartition(".")
        setattr(mods[parent] if parent else net, attr, new)
        n += 1
    return n


def _final_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(net, "forward_features"):
        return net.forward_features(x)
    return net(x)


class VolumetricRunner:
    """Inference copy of a 3-D network: ACS kernels materialised, BatchNorm folded, fast layout.

    Calling it returns the requested feature maps (float32) of a normalised ``(N, C, D, H, W)``
    batch. The copy is checked against the network on a probe volume (the folding is dropped
    when it does not reproduce it). A lock serialises forward passes (the layer hooks write
    into a shared dict), so one runner can be shared by threads.

    Parameters
    ----------
    model : torch.nn.Module
        The frozen 3-D network (not modified).
    layer_modules : list of str
        Modules whose outputs are returned, in order; ``""`` is the final feature map.
    in_chans : int
    size : (int, int, int)
        Input size ``(D, H, W)`` of the probe.
    device : torch.device
    precision : {"fp32", "mixed", "bf16"}
        ``"mixed"``: the first :data:`~skrtl._inference.MIXED_FP32_LAYERS` transfer layers in
        float32, the rest in bfloat16 (as the 2-D runner); ``"bf16"``: bfloat16 autocast.
    channels_last : bool, default=True
        Channels-last-3d memory format (faster oneDNN convolutions on CPUs).
    """

    backend = "torch"  # the 3-D networks always run in torch (see skrtl._backends)

    def __init__(
        self, model, *, layer_modules, in_chans, size, device, precision, channels_last=True
    ):
        self.layer_modules = list(layer_modules)
        self.device = torch.device(device)
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.lock = threading.Lock()
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(2, in_chans, *size, generator=gen).to(self.device)
        net = copy.deepcopy(model).eval()
        net.requires_grad_(False)
        _materialise(net)
        keep = tuple(m for m in self.layer_modules if m)
        folded = copy.deepcopy(net)
        if _fold_bn3d(folded, probe, keep=keep):
            with torch.no_grad():
                ref = _final_features(model.eval(), probe)
                got = _final_features(folded, probe)
            err = float((ref - got).abs().max()) / (float(ref.abs().max()) + 1e-12)
            if err <= 1e-3:
                net = folded
        if precision == "mixed":
            cast_deep_layers_bf16(net, model, MIXED_FP32_LAYERS)
        if self.channels_last:
            for p in list(net.parameters()) + list(net.buffers()):
                if p.dim() == 5:
                    p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
        self.net = net
        self.captured: dict[str, torch.Tensor] = {}
        wanted = [m for m in self.layer_modules if m]
        for m in wanted:
            net.get_submodule(m).register_forward_hook(capture_outputs(self.captured, m))
        self.stop_hook = None
        if wanted and "" not in self.layer_modules:
            order = call_order(net, probe[:1], forward=lambda _, x: self(x))
            last = max(wanted, key=lambda n: order.get(n, -1))
            self.stop_hook = stop_after(net.get_submodule(last))

    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        )

    def __call__(self, x: torch.Tensor, pad_to: int | None = None) -> list:
        """Feature maps (float32, one per entry of ``layer_modules``) of the batch ``x``."""
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with self.lock:
            self.captured.clear()
            final = None
            with torch.inference_mode(), self._autocast():
                try:
                    final = _final_features(self.net, x)
                except StopForward:
                    pass
            maps = [final if m == "" else self.captured.get(m) for m in self.layer_modules]
            self.captured.clear()
        return [None if t is None else t.float() for t in maps]
