"""Compiled inference backends: OpenVINO and ONNX Runtime copies of a backbone.

:func:`build_backend_runner` exports a frozen timm network (with timm's "same" paddings made
static for the input size, :func:`~skrtl._inference.static_same_padding`) to ONNX, with one
output per requested feature map, and compiles it with OpenVINO or ONNX Runtime. The result
is called like :class:`~skrtl._inference.InferenceRunner`: a normalised input batch in, the
requested feature maps (float32 torch tensors) out; pooling stays in torch.

Precision follows the torch path: ``"fp32"``; ``"bf16"`` (OpenVINO's bfloat16 inference
precision); ``"mixed"``: the network is cut into a float32 head, the first half of its
transfer layers (:data:`OPENVINO_MIXED_FP32_SHARE`, at least
:data:`~skrtl._inference.MIXED_FP32_LAYERS`), and a bfloat16 tail, two OpenVINO models run
one after the other on each micro-batch. The micro-batches of a batch run
one after the other on one OpenVINO stream that uses every thread.

Every runner is checked when it is built: its feature maps of a smooth probe image, globally
average-pooled, must agree with the float32 torch network within :data:`BACKEND_TOLERANCE`
(relative norm). A failed export, compilation or check raises :class:`BackendError`, which the
caller turns into a fallback to the torch path with a warning.
"""

from __future__ import annotations

import importlib.util
import io
import math
import queue
import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._backbone import get_transfer_layers
from ._inference import CPU_MICRO_BATCH, MIXED_FP32_LAYERS, forward_features, static_same_padding
from .utils import call_order, capture_outputs, forward_hooks

__all__ = [
    "BACKENDS",
    "BACKEND_TOLERANCE",
    "BackendError",
    "InferenceBackendWarning",
    "OPENVINO_MIXED_FP32_SHARE",
    "backend_available",
    "build_backend_runner",
    "inference_backends",
    "mixed_fp32_layers",
    "resolve_backend",
]

#: OpenVINO's mixed precision keeps this share of the transfer layers (rounded up, at least
#: :data:`~skrtl._inference.MIXED_FP32_LAYERS`) in float32. OpenVINO's float32 kernels on the
#: high-resolution early layers are about as fast as its bfloat16 ones, so a longer float32 head
#: halves the distance from float32 at nearly the same speed (torch's float32 kernels are slower:
#: its mixed path keeps only the first :data:`~skrtl._inference.MIXED_FP32_LAYERS`).
#: Measured in ``docs/benchmarks.md``.
OPENVINO_MIXED_FP32_SHARE = 0.5

#: Values of the ``backend`` parameter of :class:`~skrtl.PretrainedCNNFeatures`.
BACKENDS = ("auto", "torch", "openvino", "onnxruntime")
#: Largest accepted relative difference ``||f - f_fp32|| / ||f_fp32||`` of the average-pooled
#: feature maps of a compiled runner against the float32 torch network, per precision (the
#: torch path's own differences are below these: float32 agrees to about 1e-6, mixed precision
#: moves features by a few per cent, pure bf16 by 10-15 %).
BACKEND_TOLERANCE = {"fp32": 1e-3, "mixed": 0.08, "bf16": 0.3}
_PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}


class InferenceBackendWarning(UserWarning):
    """A requested inference backend could not be used; the torch backend runs instead."""


class BackendError(RuntimeError):
    """A compiled backend could not be built or did not reproduce the torch network."""


def backend_available(name: str) -> bool:
    """Whether the package of backend ``name`` is installed (``"torch"`` always is)."""
    if name == "torch":
        return True
    # the network reaches both backends through torch.onnx.export, which needs onnx
    return all(importlib.util.find_spec(p) is not None for p in (_PACKAGES[name], "onnx"))


def inference_backends() -> dict[str, bool]:
    """Which inference backends of :class:`~skrtl.PretrainedCNNFeatures` are installed.

    Returns
    -------
    dict of str to bool
        ``{"torch": True, "openvino": ..., "onnxruntime": ...}``; ``backend="auto"`` uses
        OpenVINO on the CPU when it is installed.
    """
    return {name: backend_available(name) for name in BACKENDS if name != "auto"}


def resolve_backend(backend: str, *, device: torch.device, precision: str, compile: bool) -> str:
    """The backend that runs.

    ``"auto"`` -> OpenVINO on the CPU when it is installed and ``compile=False``, for float32
    and for mixed-precision inference (``precision="auto"`` resolves to one of them: mixed on
    CPUs with bfloat16 kernels, float32 elsewhere); torch otherwise (``precision="bf16"``,
    CUDA, ``compile=True``). Measured side by side in ``docs/benchmarks.md``: on both kinds of
    CPU OpenVINO was the fastest path within the default's tolerance.

    Raises
    ------
    ValueError
        When an explicitly requested backend is not installed or cannot run the settings.
    """
    if backend == "auto":
        ov_precision = precision in ("fp32", "mixed", "auto")
        if device.type == "cpu" and ov_precision and not compile and backend_available("openvino"):
            return "openvino"
        return "torch"
    if backend == "torch":
        return backend
    if not backend_available(backend):
        raise ValueError(
            f"backend={backend!r} needs the {_PACKAGES[backend]!r} and 'onnx' packages, which "
            f"are not both installed: pip install 'skrtl[{backend}]', or use backend='auto' or "
            "'torch'."
        )
    if device.type != "cpu":
        raise ValueError(
            f"backend={backend!r} runs on the CPU, but device resolved to {str(device)!r}; use "
            "device='cpu', or backend='auto' / 'torch' on a GPU."
        )
    if compile:
        raise ValueError(
            f"compile=True is a torch option and cannot be combined with backend={backend!r}; "
            "use backend='torch' with compile=True, or compile=False."
        )
    if backend == "onnxruntime" and precision in ("mixed", "bf16"):
        raise ValueError(
            f"backend='onnxruntime' runs in float32 only, got precision={precision!r}; use "
            "precision='fp32' (or 'auto'), or backend='openvino' for bfloat16."
        )
    return backend


# ---------------------------------------------------------------------------------------------
class _MapsModule(nn.Module):
    """The network with one output per named module (``""``: the final feature map)."""

    def __init__(self, net: nn.Module, names: list[str]):
        super().__init__()
        self.net = net
        self.names = list(names)

    def forward(self, x):
        got: dict = {}
        pairs = [(self.net.get_submodule(n), capture_outputs(got, n)) for n in self.names if n]
        with forward_hooks(pairs):
            final = forward_features(self.net, x)
        return tuple(final if n == "" else got[n] for n in self.names)


def _smooth_probe(in_chans: int, size: tuple) -> torch.Tensor:
    """Two smooth (upsampled) random images in the normalised range, like real inputs."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(2, in_chans, 8, 8, generator=g)
    x = F.interpolate(low, size=tuple(size), mode="bilinear", align_corners=False)
    return (x - 0.45) / 0.25


def mixed_fp32_layers(n_layers: int) -> int:
    """Number of leading transfer layers that OpenVINO's mixed precision runs in float32."""
    return max(MIXED_FP32_LAYERS, math.ceil(OPENVINO_MIXED_FP32_SHARE * n_layers))


def _mixed_boundary(model: nn.Module, probe: torch.Tensor) -> str:
    """Module whose output ends the float32 part of mixed precision.

    The last float32 transfer layer's own module when it has one (a stage: its output follows
    the residual additions inside it), else its last called module.
    """
    layers = get_transfer_layers(model)
    k = mixed_fp32_layers(len(layers))
    if len(layers) <= k:
        raise BackendError("the network has too few transfer layers for mixed precision")
    order = call_order(model, probe, forward=forward_features)
    last = layers[k - 1]
    if last.name in order:
        return last.name
    called = [m for m in last.module_names if m in order]
    if not called:
        raise BackendError("the last float32 layer of mixed precision is not called")
    return max(called, key=order.__getitem__)


def _export_onnx(net: nn.Module, names: list[str], probe: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _MapsModule(net, names).eval(),
            (probe,),
            buf,
            dynamo=False,
            input_names=["x"],
            output_names=[f"out{i}" for i in range(len(names))],
            dynamic_axes={"x": {0: "n"}},
            opset_version=17,
            do_constant_folding=False,
        )
    return buf.getvalue()


def _pooled_rel_diff(got: np.ndarray, ref: torch.Tensor) -> float:
    g = torch.as_tensor(got).float().mean(dim=(2, 3))
    r = ref.float().mean(dim=(2, 3))
    return float(torch.linalg.norm(g - r) / (torch.linalg.norm(r) + 1e-12))


# ---------------------------------------------------------------------------------------------
class _CompiledRunner:
    """Shared calling convention: micro-batches in, the requested maps (float32) out.

    A lock serialises calls; one call runs its micro-batches one after the other.
    """

    backend = ""

    def __init__(self, layer_modules):
        self.layer_modules = list(layer_modules)
        self.micro_batch = CPU_MICRO_BATCH
        self.lock = threading.Lock()
        self.max_rel_diff = float("nan")

    def _run(self, x: np.ndarray, slot) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _slots(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def run_numpy(self, x: np.ndarray) -> list[np.ndarray]:
        """The requested maps of the float32 NCHW batch ``x``, as numpy arrays."""
        step = self.micro_batch
        parts = [x[i : i + step] for i in range(0, x.shape[0], step)]
        # the parts run one after the other on one stream (with every thread): spreading them
        # over several streams from a thread pool deadlocked at thread start in a fresh CI
        # environment (an OpenVINO / OpenMP interaction that was not isolated)
        with self.lock:
            slots = self._slots()
            slot = slots.get()
            try:
                outs = [self._run(p, slot) for p in parts]
            finally:
                slots.put(slot)
        return [np.concatenate([o[j] for o in outs]) for j in range(len(self.layer_modules))]

    def __call__(self, x: torch.Tensor, pad_to: int | None = None) -> list[torch.Tensor]:
        """Feature maps (float32, one per entry of ``layer_modules``) of the batch ``x``."""
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return [torch.from_numpy(m) for m in self.run_numpy(arr)]

    def check(self, model: nn.Module, in_chans: int, size: tuple, precision: str) -> None:
        """Compare with the float32 torch network on a smooth probe; raise when too far off."""
        probe = _smooth_probe(in_chans, size)
        with torch.no_grad():
            ref = _MapsModule(model, self.layer_modules)(probe)
        got = self.run_numpy(probe.numpy())
        diffs = [_pooled_rel_diff(g, r) for g, r in zip(got, ref)]
        self.max_rel_diff = max(diffs)
        tol = BACKEND_TOLERANCE[precision]
        if not all(np.isfinite(d) and d <= tol for d in diffs):
            raise BackendError(
                f"{self.backend} features differ from the float32 torch network by "
                f"{self.max_rel_diff:.3g} (relative norm; tolerance {tol:g} for "
                f"precision={precision!r})"
            )


class OpenVINORunner(_CompiledRunner):
    """OpenVINO copy of a network: one CPU stream running ``n_threads`` threads."""

    backend = "openvino"

    def __init__(self, onnx: bytes, *, names, layer_modules, precision, n_threads, boundary):
        import openvino as ov

        n_threads = max(1, int(n_threads))
        # one stream with every thread: the micro-batches run one after the other (see
        # run_numpy), so one stream per thread left all threads but one idle (1.3-1.7x slower)
        super().__init__(layer_modules)
        core = ov.Core()
        model = core.read_model(onnx)
        results = model.get_results()
        index = {n: i for i, n in enumerate(names)}
        want = [index[m] for m in self.layer_modules]

        def props(p):
            return {
                "INFERENCE_PRECISION_HINT": p,
                "INFERENCE_NUM_THREADS": n_threads,
                "NUM_STREAMS": 1,
                "PERFORMANCE_HINT": "LATENCY",
            }

        if precision != "mixed":
            self.stages = [(core.compile_model(model, "CPU", props(_OV_PRECISION[precision])),)]
            self.route = [(0, i) for i in want]  # (stage, output) of each requested map
        else:
            head, tail, head_idx, tail_idx = _split_at(ov, model, results, index[boundary])
            head_c = core.compile_model(head, "CPU", props("f32"))
            stages = [head_c]
            route = {i: (0, head_idx.index(i)) for i in head_idx}
            if tail is not None:
                stages.append(core.compile_model(tail, "CPU", props("bf16")))
                route.update({i: (1, tail_idx.index(i)) for i in tail_idx})
            self.stages = [(s,) for s in stages]
            self.route = [route[i] for i in want]
            # the tail needs the boundary map: head output 0
        self._slot_queue: queue.Queue | None = None

    def _slots(self):
        if self._slot_queue is None:
            q: queue.Queue = queue.Queue()
            q.put([s[0].create_infer_request() for s in self.stages])
            self._slot_queue = q
        return self._slot_queue

    def _run(self, x, slot):
        outs = []
        head = slot[0].infer({0: x})
        outs.append([np.array(v, copy=True) for v in head.values()])
        if len(slot) > 1:
            tail = slot[1].infer({0: outs[0][0]})
            outs.append([np.array(v, copy=True) for v in tail.values()])
        return [outs[s][i] for s, i in self.route]


_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def _split_at(ov, model, results, k: int):
    """Cut an OpenVINO model at output ``k``: (head, tail, head outputs, tail outputs).

    The head computes output ``k`` (first) and every other output it already contains; the
    tail takes output ``k`` as its only input and computes the rest.
    """
    from openvino import opset13 as ops

    src = results[k].input(0).get_source_output()
    ancestors, stack = set(), [src.get_node()]
    while stack:
        node = stack.pop()
        if node.get_name() in ancestors:
            continue
        ancestors.add(node.get_name())
        stack.extend(i.get_source_output().get_node() for i in node.inputs())
    srcs = [r.input(0).get_source_output() for r in results]
    head_idx = [k] + [
        i for i, s in enumerate(srcs) if i != k and s.get_node().get_name() in ancestors
    ]
    tail_idx = [i for i in range(len(results)) if i not in head_idx]
    head = ov.Model([srcs[i] for i in head_idx], model.get_parameters(), "skrtl_head")
    if not tail_idx:
        return head, None, head_idx, tail_idx
    clone = model.clone()
    c_results = clone.get_results()
    c_src = c_results[k].input(0).get_source_output()
    mid = ops.parameter(c_src.get_partial_shape(), c_src.get_element_type(), name="mid")
    for target in list(c_src.get_target_inputs()):
        if target.get_node().get_type_name() != "Result":
            target.replace_source_output(mid.output(0))
    try:
        tail = ov.Model([c_results[i] for i in tail_idx], [mid], "skrtl_tail")
    except RuntimeError as exc:
        raise BackendError(
            "the network cannot be cut after its float32 layers (the deep layers read the "
            "input directly)"
        ) from exc
    return head, tail, head_idx, tail_idx


class ONNXRuntimeRunner(_CompiledRunner):
    """ONNX Runtime copy of a network (float32, CPU execution provider)."""

    backend = "onnxruntime"

    def __init__(self, onnx: bytes, *, names, layer_modules, n_threads):
        import onnxruntime as ort

        super().__init__(layer_modules)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(n_threads))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])
        index = {n: i for i, n in enumerate(names)}
        self.want = [index[m] for m in self.layer_modules]
        self._slot_queue: queue.Queue = queue.Queue()
        self._slot_queue.put(None)

    def _slots(self):
        return self._slot_queue

    def _run(self, x, slot):
        outs = self.session.run(None, {"x": x})
        return [outs[i] for i in self.want]


# ---------------------------------------------------------------------------------------------
def build_backend_runner(
    backend: str,
    model: nn.Module,
    *,
    layer_modules,
    in_chans: int,
    size,
    precision: str,
    n_threads: int | None = None,
) -> _CompiledRunner:
    """An OpenVINO or ONNX Runtime runner of ``model``'s requested feature maps, checked.

    Parameters
    ----------
    backend : {"openvino", "onnxruntime"}
    model : torch.nn.Module
        The frozen network (not modified).
    layer_modules : list of str
        Modules whose outputs are returned, in order; ``""`` is the final feature map.
    in_chans : int
    size : (int, int)
        The fixed input size the runner is built for.
    precision : {"fp32", "mixed", "bf16"}
    n_threads : int, optional
        CPU threads of the compiled copy; default ``torch.get_num_threads()``.

    Returns
    -------
    runner
        Called as ``runner(x)`` with a float32 NCHW batch: one float32 tensor per entry of
        ``layer_modules``. Calls are serialised by a lock, so one runner may be shared by
        threads.

    Raises
    ------
    BackendError
        When the export, the compilation or the numerical check fails.
    """
    n_threads = torch.get_num_threads() if n_threads is None else int(n_threads)
    size = tuple(int(s) for s in size)
    layer_modules = list(layer_modules)
    try:
        probe = torch.zeros(2, in_chans, *size)
        net, _ = static_same_padding(model, probe)  # a private copy
        boundary = None
        names = list(dict.fromkeys(layer_modules))
        if backend == "openvino" and precision == "mixed":
            boundary = _mixed_boundary(model, probe)
            names = list(dict.fromkeys([boundary, *names]))
        onnx = _export_onnx(net, names, probe)
        del net
        if backend == "openvino":
            runner: _CompiledRunner = OpenVINORunner(
                onnx,
                names=names,
                layer_modules=layer_modules,
                precision=precision,
                n_threads=n_threads,
                boundary=boundary,
            )
        elif backend == "onnxruntime":
            if precision != "fp32":
                raise BackendError(f"onnxruntime runs float32 only, not {precision!r}")
            runner = ONNXRuntimeRunner(
                onnx, names=names, layer_modules=layer_modules, n_threads=n_threads
            )
        else:
            raise BackendError(f"unknown backend {backend!r}")
        runner.check(model, in_chans, size, precision)
    except BackendError:
        raise
    except Exception as exc:  # export/compile errors of exotic layers: the caller falls back
        raise BackendError(f"{type(exc).__name__}: {exc}") from exc
    return runner
