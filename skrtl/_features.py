"""Frozen pretrained-CNN features for scikit-learn pipelines (linear probing).

:class:`PretrainedCNNFeatures` turns images (2-D, 2.5-D or 3-D, with optional lesion masks) into
a feature matrix with a frozen pretrained backbone, so that any scikit-learn estimator can be
trained on top of it::

    Pipeline([("cnn", PretrainedCNNFeatures()), ("clf", LogisticRegression())])

The work per image is the shared preprocessing path (:mod:`skrtl._preprocess`: intensity
scaling, slicing of volumes, resizing, the backbone's normalisation), one forward pass of a fast
inference copy of the network (:mod:`skrtl._inference`; for the 3-D networks of
``volumetric="acs"`` / ``"inflate"``, :class:`~skrtl._volumetric.VolumetricRunner`) and
(masked) global pooling of one or several feature maps. Batches are streamed: memory holds one
batch of network inputs and the output matrix, never the whole data set as a tensor. A
content-keyed, process-wide LRU cache stores each image's features, so that a
:class:`~sklearn.model_selection.GridSearchCV` over the downstream classifier runs the CNN once
per image.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import re
import warnings
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._backbone import (
    DEFAULT_BACKBONE,
    backbone_data_config,
    get_transfer_layers,
    pretrained_backbone,
)
from ._backends import (
    BACKENDS,
    BackendError,
    InferenceBackendWarning,
    build_backend_runner,
    resolve_backend,
)
from ._base import BaseTorchImageEstimator, ImageEstimatorMixin, PassthroughMixin
from ._imaging import ImageInput
from ._inference import InferenceRunner, forward_features
from ._volumetric import VolumetricRunner, pretrained_volumetric_backbone
from .utils import (
    LRUCache,
    bf16_supported,
    call_order,
    fingerprint,
    forward_hooks,
    hash_array,
    open_disk_cache,
    resolve_device,
)

__all__ = [
    "PretrainedCNNFeatures",
    "clear_feature_cache",
    "feature_cache_info",
]

_POOLINGS = ("avg", "max", "gem", "avgmax")

# process-wide caches: features per (image, settings, network state); inference copies per
# exact network state and settings
_FEATURE_CACHE = LRUCache(max_bytes=512 * 2**20)
_RUNNER_CACHE = LRUCache(2)
_CACHE_INFO_KEYS = ("entries", "bytes", "max_bytes", "hits", "misses")


def clear_feature_cache() -> None:
    """Empty the process-wide caches of :class:`PretrainedCNNFeatures`.

    Drops the cached features and the cached inference copies of the networks (the torch
    copies and the compiled OpenVINO / ONNX Runtime ones; a fitted transformer keeps the copy
    it already uses). The persistent ``cache_dir`` caches are left alone.
    """
    _FEATURE_CACHE.clear()
    _RUNNER_CACHE.clear()


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
        if not isinstance(max_mb, Real) or isinstance(max_mb, bool) or max_mb < 0:
            raise ValueError(f"max_mb must be a non-negative number, got {max_mb!r}.")
        _FEATURE_CACHE.resize(max_bytes=int(max_mb * 2**20))
    info = _FEATURE_CACHE.info()
    return {k: info[k] for k in _CACHE_INFO_KEYS}


class PretrainedCNNFeatures(
    ImageEstimatorMixin, PassthroughMixin, TransformerMixin, BaseTorchImageEstimator
):
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
        volume centre), see ``slices``. ``"3d"``: volumes ``(D, H, W)``, run as set by
        ``volumetric``.
    volumetric : {"slices", "acs", "inflate"}, default="slices"
        How ``mode="3d"`` runs the network. ``"slices"``: every axial slice (those with mask
        pixels when a mask is given) is featurised by the 2-D network and the slice features
        are aggregated (``aggregate``). ``"acs"`` / ``"inflate"``: the whole volume, resized
        to ``input_size`` ``(D, H, W)``, goes through a 3-D network made from the pretrained
        2-D one (:func:`skrtl.convert_to_3d`: ACS convolutions, or I3D-inflated kernels),
        and the 3-D feature maps are pooled (masked pooling over the 3-D grid). See
        ``docs/features.md``.
    slices : {"orthogonal", "adjacent"}, default="orthogonal"
        2.5-D planes: the three orthogonal planes, or ``n_slices`` adjacent axial slices.
    n_slices : int, default=3
        Number of adjacent slices for ``slices="adjacent"``.
    aggregate : {"mean", "max"}, default="mean"
        How slice-wise 3-D mode combines the slice features of one volume.
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
        each feature map (the 3-D grid of a volumetric network); average and GeM pooling weight
        every cell by its mask fraction, max pooling takes cells with a non-zero fraction.
        Without masks, whole-image pooling.
    input_size : int, (int, int), (int, int, int) or "auto", default="auto"
        Images are resized (bilinear, antialiased) to this size (height, width); volumes of a
        volumetric network to (depth, height, width) (an int: a cube), trilinearly.
        ``"auto"``: 224 for images and 2-D network slices, 64 (a 64^3 cube) for volumetric
        networks.
    intensity : {"auto", "window", "percentile", "minmax", "uint8", "none"}, default="auto"
        Intensity scaling to [0, 1] before the backbone normalisation (the one preprocessing
        path of every torch estimator, :mod:`skrtl._preprocess`). ``"auto"``: ``"window"``
        when ``windows`` are given, ``"uint8"`` (divide by 255) for ``uint8`` images, else
        ``"percentile"`` (clip to ``percentiles`` of the whole image).
    windows : list of (level, width), optional
        CT windows in HU; each window is one input channel (e.g. ``[(40, 400), (-600, 1500),
        (400, 1800)]``: soft tissue, lung and bone as the three RGB channels).
    percentiles : (float, float), default=(0.5, 99.5)
        Clip range of ``intensity="percentile"``.
    batch_size : int, default=32
        Network images per forward pass.
    device : str, default="auto"
        ``"auto"``: CUDA when available, else CPU.
    precision : {"auto", "mixed", "fp32", "bf16", "fp16"}, default="auto"
        ``"auto"``: ``"mixed"`` on CPUs with bfloat16 kernels (AVX512-BF16/AMX), else
        ``"fp32"`` (also on CUDA). ``"mixed"``: the first transfer layers run in float32,
        the rest in bfloat16 (OpenVINO: the first half of them, see
        :data:`~skrtl._backends.OPENVINO_MIXED_FP32_SHARE`; torch: the stem and the first
        block group): faster than fp32 on such CPUs, with pooled features
        within :data:`~skrtl._backends.BACKEND_TOLERANCE` ``["mixed"]`` (8 %, relative norm)
        of fp32, whatever the backend (the measured speed and accuracy are in
        ``docs/benchmarks.md``). ``"fp16"``: float16 autocast, CUDA only. ``"fp32"``:
        float32, numerically the plain network (BatchNorm folding changes results by
        rounding only). ``"bf16"``: the whole network in bfloat16 (autocast on CUDA); faster
        than ``"mixed"``, but rounding the smooth activations of upsampled grey-level images
        in the first block is amplified, which moves the features noticeably. Features are
        always returned as float32. Volumetric networks use
        ``"fp32"``, ``"mixed"`` and ``"bf16"`` (by autocast).
    compile : bool, default=False
        Run the network through :func:`torch.compile` (with constant folding). The first
        call compiles for a while and recompiles after the BatchNorm statistics change; on
        CPUs it can be slower than the eager default (no micro-batches or fused
        activations), so it is off by default. Only used for ``layers="final"`` and the torch
        backend.
    backend : {"auto", "torch", "openvino", "onnxruntime"}, default="auto"
        What runs the network on the CPU. ``"auto"`` (default): OpenVINO for float32 and
        mixed-precision inference (so for ``precision="auto"`` on every CPU) when the
        ``openvino`` package is installed (``pip install 'skrtl[openvino]'``), the device is
        the CPU and ``compile=False``; skrtl's own torch inference copy otherwise
        (``precision="bf16"``, CUDA, ``compile=True``, 3-D networks).
        ``"torch"``: always skrtl's torch inference copy (:mod:`skrtl._inference`).
        ``"openvino"``: the network (with static paddings, one output per requested feature
        map) is exported to ONNX and compiled by OpenVINO for the fitted input size and
        precision, once per network state; ``"mixed"`` runs a float32 head (the first half
        of the transfer layers) and a bfloat16 tail. ``"onnxruntime"``: ONNX Runtime, float32 only
        (``precision="auto"`` then means ``"fp32"``). Every compiled copy is checked against
        the float32 torch network when it is built (average-pooled feature maps of a probe
        image within :data:`~skrtl._backends.BACKEND_TOLERANCE`); a failed export,
        compilation or check falls back to torch with an
        :class:`~skrtl.InferenceBackendWarning` (for ``"auto"`` too). Pooling (masked or
        not) runs outside the compiled network, so every ``layers`` / ``pooling``
        combination works with every backend. Features of different backends differ by
        float rounding (about 1e-6 relative in float32), so the feature caches keep them
        apart. 3-D networks (``volumetric``) always run in torch.
    cache : bool, default=True
        Look features up in (and store them into) the process-wide LRU cache, keyed by a hash
        of the image (and mask) content (the file identity for cohort files), every parameter
        that changes the features and the exact network state. See :func:`feature_cache_info`
        / :func:`clear_feature_cache`.
    cache_dir : str, path or None, default=None
        A folder for a persistent feature cache with the same keys, shared by processes and
        runs (safe with concurrent writers; values stored as raw bytes, never pickled): a
        second process or a later run over the same cohort reads the features instead of
        computing them.
    cache_size_mb : float, default=2048
        Size bound of the ``cache_dir`` cache (least recently used entries are evicted).
    n_jobs : int or None, default=None
        Extract in parallel with joblib (``None`` = 1, ``-1`` = all cores): the rows are cut
        into chunks of whole batches, each transformed by a worker. Under
        ``joblib.parallel_config(backend="dask")`` the chunks run on a Dask cluster. The
        result equals the serial one.
    passthrough : str, list of str or None, default=None
        Columns of the image frame appended, unchanged, after the features (e.g.
        ``["site", "age"]``), so that the next Pipeline step sees them: ComBat reads the site
        column, clinical covariates reach the model. Non-numeric columns need
        ``set_output(transform="pandas")`` (a DataFrame output; a clear error otherwise).
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
    backend_ : str
        The resolved backend: ``"torch"``, ``"openvino"`` or ``"onnxruntime"`` (a backend
        that fails to build falls back to torch with a warning at the first ``transform``).
    in_chans_ : int
        Network input channels (3, or the number of intensity channels when it is not 1 or 3).
    preprocessor_ : ImagePreprocessor
        The preprocessing from images to network input (intensity, slicing, size, channels,
        normalisation), shared with every torch estimator.
    layers_ : list of str
        Resolved layer tags (``"l9"``, ...) in output order.
    layer_modules_ : list of str
        Module of the network whose output each entry of ``layers_`` pools (``""``: the
        final feature map, ``forward_features``); read by :func:`skrtl.explain`.
    passthrough_ : list of str
        The passthrough columns (empty without ``passthrough``).
    n_features_out_ : int
        Number of output columns (CNN features, then the passthrough columns).

    Notes
    -----
    The network output does not depend on the training data: ``fit`` only loads the backbone
    and validates the input. Features are deterministic for a given device and precision.
    ``transform`` is safe to call from several threads at once (forward passes of one network
    state are serialised by a lock, for every backend; the feature cache is thread-safe).
    Compiled OpenVINO / ONNX Runtime copies live in a process-wide cache and are never
    pickled: an unpickled or cloned transformer rebuilds its copy at its first ``transform``
    (as does each joblib worker process with ``n_jobs``).
    Masks, spacing and site labels travel in the image frame (:func:`skrtl.make_image_frame`),
    which survives :class:`~sklearn.pipeline.Pipeline`, cross-validation and grid search.

    A file frame (:func:`skrtl.read_cohort`) is accepted as it is: ``fit`` reads only the file
    headers, ``transform`` loads one case at a time while it fills a batch, so peak memory does
    not grow with the cohort. Cached features of file cases are keyed by the files' identity
    (path, size, modification time, label, reader settings), not by their pixels, so a cache
    hit loads nothing.
    """

    _parameter_constraints: dict = {
        **BaseTorchImageEstimator._parameter_constraints,
        "aggregate": [StrOptions({"mean", "max"})],
        "layers": [str, Integral, list, tuple],
        "pooling": [StrOptions(set(_POOLINGS))],
        "gem_p": [Interval(Real, 0, None, closed="neither")],
        "mask_pooling": ["boolean"],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "precision": [StrOptions({"auto", "mixed", "bf16", "fp16", "fp32"})],
        "compile": ["boolean"],
        "backend": [StrOptions(set(BACKENDS))],
        "cache": ["boolean"],
        "cache_dir": [str, os.PathLike, None],
        "cache_size_mb": [Interval(Real, 0, None, closed="neither")],
        "n_jobs": [Integral, None],
        "passthrough": [str, list, tuple, None],
    }

    def __init__(
        self,
        *,
        backbone=DEFAULT_BACKBONE,
        weights=None,
        pretrained=True,
        mode="2d",
        volumetric="slices",
        slices="orthogonal",
        n_slices=3,
        aggregate="mean",
        layers="final",
        pooling="avg",
        gem_p=3.0,
        mask_pooling=True,
        input_size="auto",
        intensity="auto",
        windows=None,
        percentiles=(0.5, 99.5),
        batch_size=32,
        device="auto",
        precision="auto",
        compile=False,
        backend="auto",
        cache=True,
        cache_dir=None,
        cache_size_mb=2048,
        n_jobs=None,
        passthrough=None,
        verbose=0,
    ):
        self.backbone = backbone
        self.weights = weights
        self.pretrained = pretrained
        self.mode = mode
        self.volumetric = volumetric
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
        self.backend = backend
        self.cache = cache
        self.cache_dir = cache_dir
        self.cache_size_mb = cache_size_mb
        self.n_jobs = n_jobs
        self.passthrough = passthrough
        self.verbose = verbose

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
        order = call_order(model, probe, forward=forward_features)
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

    def _resolve_precision(self) -> str:
        if self.precision == "fp16" and self.device_.type != "cuda":
            raise ValueError(
                f"precision='fp16' is float16 autocast on CUDA, but device resolved to "
                f"{str(self.device_)!r}; use precision='auto' (mixed fp32/bf16 on CPUs with "
                "bfloat16 kernels) or 'fp32' on the CPU."
            )
        if self.precision == "auto":
            mixed = self.device_.type == "cpu" and bf16_supported(self.device_)
            return "mixed" if mixed else "fp32"
        if self.precision in ("bf16", "mixed") and not bf16_supported(self.device_):
            raise ValueError(
                f"precision={self.precision!r} is not supported on {self.device_} (no "
                "bfloat16 kernels); use precision='auto' (bfloat16 only where supported) "
                "or 'fp32'."
            )
        return self.precision

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
        size, windows = self._check_image_params()
        data = self._read(X)
        self._fit_passthrough(X)
        in_chans = self._network_in_chans(self._intensity_channels(windows, data))
        self.device_ = resolve_device(self.device)
        if self._volumetric and self.backend not in ("auto", "torch"):
            raise ValueError(
                f"PretrainedCNNFeatures: backend={self.backend!r} does not run the 3-D networks "
                f"of volumetric={self.volumetric!r}; use backend='torch' (or 'auto')."
            )
        self.backend_ = (
            "torch"
            if self._volumetric
            else resolve_backend(
                self.backend, device=self.device_, precision=self.precision, compile=self.compile
            )
        )
        self.precision_ = "fp32" if self.backend_ == "onnxruntime" else self._resolve_precision()
        if self._volumetric:
            model, fp, memo = pretrained_volumetric_backbone(
                self.backbone,
                self.weights,
                self.pretrained,
                in_chans,
                self.device_,
                self.volumetric,
            )
        else:
            model, fp, memo = pretrained_backbone(
                self.backbone, self.weights, self.pretrained, in_chans, self.device_
            )
        cfg = backbone_data_config(model)
        self._check_min_size(size, cfg["min_size"])
        self.preprocessor_ = self._make_preprocessor(
            size=size, windows=windows, in_chans=in_chans, mean=cfg["mean"], std=cfg["std"]
        )
        self.in_chans_ = in_chans
        self.input_size_ = size
        self.windows_ = windows
        self.mean_ = self.preprocessor_.mean
        self.std_ = self.preprocessor_.std
        memo_key = (size, repr(self._layer_entries()))
        if memo_key not in memo:
            probe = torch.zeros(1, in_chans, *size, device=self.device_)
            resolved = self._resolve_layers(model, probe)
            memo[memo_key] = (resolved, *self._probe_dims(model, resolved, probe))
        resolved, dims, grids = memo[memo_key]
        if self.mask_pooling and data.masks is not None and min(map(math.prod, grids)) == 1:
            warnings.warn(
                f"PretrainedCNNFeatures: with input_size={self.input_size!r} a requested feature "
                "map is 1 x 1, so masked pooling cannot tell the lesion from its surroundings "
                "there: the mask has no effect on those features. Use a larger input_size "
                "(e.g. >= 64) or an earlier layer (layers=[...]).",
                UserWarning,
                stacklevel=2,
            )
        # shared with other estimators until _skrtl_torch_module() takes a private copy
        self.model_ = model
        self._owns_model = False
        self._fingerprint = fp
        self._fast = None
        self.layers_ = [tag for tag, _ in resolved]
        self._layer_modules = [m for _, m in resolved]
        self.layer_modules_ = list(self._layer_modules)
        self.layer_dims_ = dims
        pools = ["avg", "max"] if self.pooling == "avgmax" else [self.pooling]
        names = []
        for tag, dim in zip(self.layers_, dims):
            for pool in pools:
                names.extend(f"cnn_{tag}_{pool}_{k:04d}" for k in range(dim))
        self._cnn_names = np.asarray(names, dtype=object)
        self._feature_names = np.asarray(names + self.passthrough_, dtype=object)
        self.n_features_out_ = len(self._feature_names)
        return self

    def _probe_dims(self, model, resolved, probe) -> tuple[list[int], list[tuple]]:
        """Channels and spatial grid ((h, w) or (d, h, w)) of every requested feature map."""
        got: dict[str, tuple] = {}

        def make(name):
            def hook(mod, args, out):
                got[name] = tuple(int(v) for v in out.shape[1:])

            return hook

        pairs = [(model.get_submodule(m), make(m)) for _, m in resolved if m]
        with forward_hooks(pairs), torch.no_grad():
            final = forward_features(model, probe)
        if final.ndim != probe.ndim:
            raise ValueError(
                f"backbone {self.backbone!r} does not produce a spatial feature map (got shape "
                f"{tuple(final.shape)}); PretrainedCNNFeatures needs a CNN."
            )
        got[""] = tuple(int(v) for v in final.shape[1:])
        return [got[m][0] for _, m in resolved], [got[m][1:] for _, m in resolved]

    # ----------------------------------------------------------------------------------------
    # fast network copy
    # ----------------------------------------------------------------------------------------
    def _get_fast(self) -> InferenceRunner:
        fast = getattr(self, "_fast", None)
        if fast is not None:
            return fast
        compiled = bool(self.compile) and self._layer_modules == [""] and not self._volumetric
        if self.compile and not compiled:
            warnings.warn(
                "compile=True is only used with layers='final' and 2-D networks; running eagerly.",
                UserWarning,
                stacklevel=3,
            )
        backend = getattr(self, "backend_", "torch")
        key = (
            self._state_fingerprint(),
            str(self.device_),
            self.precision_,
            tuple(self._layer_modules),
            self.in_chans_,
            self.input_size_,
            compiled,
            backend,
            torch.get_num_threads() if backend != "torch" else None,
        )
        runner = _RUNNER_CACHE.get(key)
        if runner is None and self._volumetric:
            runner = VolumetricRunner(
                self.model_,
                layer_modules=self._layer_modules,
                in_chans=self.in_chans_,
                size=self.input_size_,
                device=self.device_,
                precision=self.precision_,
            )
            _RUNNER_CACHE.put(key, runner)
        elif runner is None and backend != "torch":
            try:
                runner = build_backend_runner(
                    backend,
                    self.model_,
                    layer_modules=self._layer_modules,
                    in_chans=self.in_chans_,
                    size=self.input_size_,
                    precision=self.precision_,
                )
            except BackendError as exc:
                warnings.warn(
                    f"PretrainedCNNFeatures: backend={backend!r} could not be used ({exc}); "
                    "falling back to the torch backend. Pass backend='torch' to silence this.",
                    InferenceBackendWarning,
                    stacklevel=3,
                )
            else:
                _RUNNER_CACHE.put(key, runner)
        if runner is None:
            runner = InferenceRunner(
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

    def _effective_backend(self) -> str:
        """The backend of the built inference copy (after any fallback), else ``backend_``."""
        fast = getattr(self, "_fast", None)
        if fast is not None:
            return fast.backend
        return getattr(self, "backend_", "torch")

    def _state_fingerprint(self) -> str:
        fp = getattr(self, "_fingerprint", None)
        if fp is None:
            fp = self._fingerprint = fingerprint(self.model_)
        return fp

    # ----------------------------------------------------------------------------------------
    def _pool(self, fmap: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Global (masked) pooling of ``(N, C, h, w)`` or, in 3-D, ``(N, C, d, h, w)`` maps.

        The mask (fraction of each input pixel / voxel inside the lesion) is area-averaged
        onto the feature grid: each cell's weight is the fraction of its receptive-field
        block inside the mask.
        """
        pools = ["avg", "max"] if self.pooling == "avgmax" else [self.pooling]
        dims = tuple(range(2, fmap.dim()))
        w = None
        if mask is not None:
            area = F.adaptive_avg_pool3d if fmap.dim() == 5 else F.adaptive_avg_pool2d
            w = area(mask.to(fmap.device, torch.float32), fmap.shape[2:])
            wsum = w.sum(dim=dims)
            if bool((wsum <= 0).any()):  # pragma: no cover - read_image_frame rejects these
                raise ValueError("a mask is empty after resizing; masked pooling is undefined.")
        outs = []
        for pool in pools:
            if pool == "avg":
                out = fmap.mean(dim=dims) if w is None else (fmap * w).sum(dims) / wsum
            elif pool == "max":
                if w is None:
                    out = fmap.amax(dim=dims)
                else:
                    out = fmap.masked_fill(w <= 0, float("-inf")).amax(dim=dims)
            else:  # gem
                p = float(self.gem_p)
                f = fmap.clamp_min(1e-6).pow(p)
                m = f.mean(dim=dims) if w is None else (f * w).sum(dims) / wsum
                out = m.pow(1.0 / p)
            outs.append(out)
        return torch.cat(outs, dim=1)

    def _pool_numpy(self, fmap: np.ndarray, mask: torch.Tensor | None) -> np.ndarray:
        """:meth:`_pool` in numpy, for the maps of a compiled backend.

        numpy reduces these small maps on the calling thread; torch's thread pool would
        compete with the backend's worker threads that are still spinning.
        """
        pools = ["avg", "max"] if self.pooling == "avgmax" else [self.pooling]
        w = None
        if mask is not None:
            w = F.adaptive_avg_pool2d(mask.to(torch.float32), fmap.shape[2:]).numpy()
            wsum = w.sum(axis=(2, 3))
            if bool((wsum <= 0).any()):  # pragma: no cover - read_image_frame rejects these
                raise ValueError("a mask is empty after resizing; masked pooling is undefined.")
        outs = []
        for pool in pools:
            if pool == "avg":
                out = fmap.mean(axis=(2, 3)) if w is None else (fmap * w).sum((2, 3)) / wsum
            elif pool == "max":
                src = fmap if w is None else np.where(w > 0, fmap, -np.inf)
                out = src.max(axis=(2, 3))
            else:  # gem
                p = float(self.gem_p)
                f = np.power(np.maximum(fmap, 1e-6), p)
                mean = f.mean(axis=(2, 3)) if w is None else (f * w).sum((2, 3)) / wsum
                out = np.power(mean, 1.0 / p)
            outs.append(out.astype(np.float32, copy=False))
        return np.concatenate(outs, axis=1)

    def _features_of_batch(self, x, m, fast: InferenceRunner) -> np.ndarray:
        mask = m if (self.mask_pooling and m is not None) else None
        if fast.backend != "torch":
            maps_np = fast.run_numpy(x.detach().to("cpu", torch.float32).contiguous().numpy())
            feats_np = [self._pool_numpy(fmap, mask) for fmap in maps_np]
            return np.concatenate(feats_np, axis=1).astype(np.float32, copy=False)
        maps = fast(x, pad_to=self.batch_size)
        feats = [self._pool(fmap, mask) for fmap in maps]
        return torch.cat(feats, dim=1).cpu().numpy().astype(np.float32, copy=False)

    # ----------------------------------------------------------------------------------------
    def _config_key(self) -> bytes:
        cfg = (
            "v2",
            self.backbone,
            self._state_fingerprint(),
            self.preprocessor_.key(),
            self.aggregate if self.mode == "3d" and not self._volumetric else None,
            tuple(self._layer_modules),
            self.pooling,
            float(self.gem_p) if self.pooling == "gem" else None,
            bool(self.mask_pooling),
            self.device_.type,
            self.precision_,
            bool(self.compile) and self._layer_modules == [""],
            self._effective_backend(),
        )
        return hashlib.blake2b(repr(cfg).encode(), digest_size=16).digest()

    def _sample_keys(self, data: ImageInput, base: bytes) -> list[bytes]:
        if data.keys is not None:  # file cases: their identity, no pixels loaded
            return [hashlib.blake2b(base + k, digest_size=20).digest() for k in data.keys]
        keys = []
        for i, img in enumerate(data.images):
            h = hashlib.blake2b(base, digest_size=20)
            hash_array(h, img)
            h.update(str(data.dtype(i)).encode())  # the raw dtype drives intensity="auto"
            mask = data.masks[i] if data.masks is not None else None
            # masks change the features through masked pooling and volume slicing
            if mask is not None and (self.mask_pooling or self.mode != "2d"):
                hash_array(h, np.packbits(mask))
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
            The features (float64 when numeric passthrough columns follow them; a DataFrame
            with ``set_output(transform="pandas")``).
        """
        check_is_fitted(self, "model_")
        data = self._read(X)
        n = len(data)
        width = len(self._cnn_names)
        out = np.zeros((n, width), dtype=np.float32)
        disk = (
            None
            if self.cache_dir is None
            else open_disk_cache(self.cache_dir, max_mb=self.cache_size_mb)
        )
        keys, todo = self._lookup(data, disk, out)
        if todo and keys is not None and self._effective_backend() != "torch":
            used = self._effective_backend()
            self._get_fast()
            if self._effective_backend() != used:  # fell back to torch: other cache keys
                keys, todo = self._lookup(data, disk, out)
        if todo:
            if self.n_jobs in (None, 1) or len(todo) <= self.batch_size:
                self._extract(data, todo, out)
            else:
                self._extract_parallel(X, todo, out)
            if keys is not None:
                for i in todo:
                    if self.cache:
                        _FEATURE_CACHE.put(keys[i], out[i].copy())
                    if disk is not None:
                        disk.put_array(keys[i], out[i])
        return self._with_passthrough(out, X, self._cnn_names)

    def _lookup(self, data: ImageInput, disk, out: np.ndarray) -> tuple[list | None, list[int]]:
        """Fill ``out`` with cached features: (keys or None without caches, rows to compute)."""
        if not self.cache and disk is None:
            return None, list(range(len(data)))
        width = out.shape[1]
        keys = self._sample_keys(data, self._config_key())
        todo = []
        for i, key in enumerate(keys):
            hit = _FEATURE_CACHE.get(key) if self.cache else None
            if hit is None and disk is not None:
                hit = disk.get_array(key, dtype=np.float32, size=width)
                if hit is not None and self.cache:
                    _FEATURE_CACHE.put(key, hit)
            if hit is None:
                todo.append(i)
            else:
                out[i] = hit
        return keys, todo

    def _extract_parallel(self, X, rows: list[int], out: np.ndarray) -> None:
        """Features of ``rows`` computed by joblib workers, a chunk of whole batches each.

        Each worker gets a copy of this transformer (without the caches) and the rows of ``X``
        (file cases are read by the worker), so ``joblib.parallel_config(backend="dask")``
        spreads the cases over a Dask cluster.
        """
        from joblib import Parallel, delayed, effective_n_jobs

        n_chunks = max(1, min(len(rows) // self.batch_size, 4 * effective_n_jobs(self.n_jobs)))
        per = -(-len(rows) // n_chunks)
        per = -(-per // self.batch_size) * self.batch_size  # whole batches: the same micro-batches
        chunks = [rows[i : i + per] for i in range(0, len(rows), per)]
        worker = copy.copy(self)
        worker.cache, worker.cache_dir, worker.n_jobs, worker.verbose = False, None, None, 0
        worker._fast = None
        results = Parallel(n_jobs=self.n_jobs)(
            delayed(_worker_features)(worker, _take_rows(X, chunk)) for chunk in chunks
        )
        for chunk, feats in zip(chunks, results):
            out[chunk] = feats

    def _extract(self, data: ImageInput, rows: list[int], out: np.ndarray) -> None:
        fast = self._get_fast()
        counts = np.zeros(out.shape[0], dtype=np.int64)
        use_max = self.mode == "3d" and self.aggregate == "max" and not self._volumetric
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
            for x, m, owners in self.preprocessor_.iter_batches(data, rows, self.batch_size):
                feats = self._features_of_batch(x, m, fast)
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
    # the torch network protocol (skrtl._base.TorchNetworkMixin)
    # ----------------------------------------------------------------------------------------
    def _skrtl_torch_module(self) -> nn.Module:
        """The backbone, as a private copy (callers such as AdaBN may change its state)."""
        check_is_fitted(self, "model_")
        if not getattr(self, "_owns_model", True):
            self.model_ = copy.deepcopy(self.model_)
            self._owns_model = True
        return self.model_

    def _skrtl_iter_inputs(self, X, batch_size=None):
        """Yield ``(x, idx)``: normalised float32 NCHW (NCDHW) input batches on its device."""
        check_is_fitted(self, "model_")
        data = self._read(X)
        bs = self.batch_size if batch_size is None else int(batch_size)
        for x, _, owners in self.preprocessor_.iter_batches(data, range(len(data)), bs):
            yield x.to(self.device_), owners

    def _skrtl_invalidate_cache(self) -> None:
        """Forget the fast network copy and the state fingerprint (BatchNorm stats changed).

        Cached features are keyed by the exact network state, so entries of other states stay
        valid and are reused when that state comes back.
        """
        self._fast = None
        self._fingerprint = None

    def _skrtl_network_copy(self):
        """A copy of this fitted transformer with a private copy of the backbone."""
        check_is_fitted(self, "model_")
        new = copy.copy(self)
        new.model_ = copy.deepcopy(self.model_)
        new._owns_model = True
        new._fast = None
        new._fingerprint = self._fingerprint
        return new

    # ----------------------------------------------------------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fast"] = None
        if "_owns_model" in state:
            state["_owns_model"] = True  # an unpickled model_ is a private copy
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags


def _take_rows(X, rows):
    """Rows ``rows`` of an image array, list or frame."""
    import pandas as pd

    if isinstance(X, pd.DataFrame):
        return X.iloc[list(rows)]
    if isinstance(X, list | tuple):
        return [X[i] for i in rows]
    return np.asarray(X)[list(rows)]


def _worker_features(est: PretrainedCNNFeatures, X) -> np.ndarray:
    """CNN features of ``X`` (a joblib job of :meth:`PretrainedCNNFeatures._extract_parallel`)."""
    data = est._read(X)
    out = np.zeros((len(data), len(est._cnn_names)), dtype=np.float32)
    est._extract(data, list(range(len(data))), out)
    return out
