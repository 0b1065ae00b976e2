"""Compiled inference backends (OpenVINO, ONNX Runtime) of PretrainedCNNFeatures."""

from __future__ import annotations

import pickle
import threading
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import blob_images
from sklearn.base import clone

import skrtl._backends as backends
from skrtl import (
    InferenceBackendWarning,
    PretrainedCNNFeatures,
    clear_feature_cache,
    feature_cache_info,
    get_transfer_layers,
    inference_backends,
    make_image_frame,
)
from skrtl.utils import bf16_supported

TINY = dict(input_size=32, batch_size=4, layers=[2, "final"], pooling="avgmax")


def _needs(name):
    if not inference_backends()[name]:
        pytest.skip(f"{name} is not installed")


def _frame(n=6):
    X, _, masks = blob_images(n=n)
    return make_image_frame(X, masks=masks)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.filterwarnings("ignore:PretrainedCNNFeatures. with input_size=32")
@pytest.mark.parametrize("name", ["openvino", "onnxruntime"])
def test_fp32_backend_matches_torch_with_layers_and_masked_pooling(name):
    _needs(name)
    frame = _frame()
    ref = PretrainedCNNFeatures(**TINY, precision="fp32", backend="torch", cache=False)
    fe = PretrainedCNNFeatures(**TINY, precision="fp32", backend=name, cache=False)
    a, b = ref.fit_transform(frame), fe.fit_transform(frame)
    assert fe.backend_ == name and fe._effective_backend() == name
    assert b.shape == a.shape and b.dtype == np.float32
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * np.abs(a).max())
    # masks matter: the masked features are not the whole-image ones
    whole = PretrainedCNNFeatures(**TINY, precision="fp32", backend=name, mask_pooling=False)
    assert _rel(whole.fit_transform(frame), b) > 1e-3


def test_openvino_mixed_precision_is_close_to_torch_mixed():
    _needs("openvino")
    if not bf16_supported(torch.device("cpu")):
        pytest.skip("no bfloat16 kernels on this CPU")
    X, _, _ = blob_images(n=6)
    fp32 = PretrainedCNNFeatures(input_size=32, precision="fp32", backend="torch").fit(X)
    ov = PretrainedCNNFeatures(input_size=32, precision="mixed", backend="openvino").fit(X)
    tm = PretrainedCNNFeatures(input_size=32, precision="mixed", backend="torch").fit(X)
    ref, got, torch_mixed = fp32.transform(X), ov.transform(X), tm.transform(X)
    assert ov._fast.backend == "openvino" and len(ov._fast.stages) == 2  # fp32 head, bf16 tail
    assert _rel(got, ref) < backends.BACKEND_TOLERANCE["mixed"]
    # the longer float32 head is not further from float32 than torch's mixed split
    assert _rel(got, ref) < _rel(torch_mixed, ref) + 1e-3


def test_openvino_mixed_split_ends_a_stage_halfway_through_the_network():
    X, _, _ = blob_images(n=2)
    fe = PretrainedCNNFeatures(input_size=32, backend="torch", precision="fp32").fit(X)
    layers = get_transfer_layers(fe.model_)
    k = backends.mixed_fp32_layers(len(layers))
    assert k == -(-len(layers) // 2) and k >= backends.MIXED_FP32_LAYERS
    assert backends.mixed_fp32_layers(3) == backends.MIXED_FP32_LAYERS  # at least the torch head
    # lite0 (stem, blocks.0-6, head): the float32 head ends with stage blocks.3, whose output
    # follows its residual additions (a module inside it would cut a residual branch)
    assert backends._mixed_boundary(fe.model_, torch.zeros(1, 3, 32, 32)) == layers[k - 1].name
    assert layers[k - 1].name == "blocks.3"


def test_auto_is_the_default_and_runs_float32_and_mixed_inference_in_openvino():
    _needs("openvino")
    X, _, _ = blob_images(n=2)
    fp32 = PretrainedCNNFeatures(input_size=32, precision="fp32").fit(X)
    assert fp32.backend == "auto" and fp32.backend_ == "openvino"
    auto_compiled = PretrainedCNNFeatures(input_size=32, precision="fp32", compile=True)
    assert auto_compiled.fit(X).backend_ == "torch"
    cpu = torch.device("cpu")
    for precision, expected in [
        ("auto", "openvino"),  # fp32 or mixed, whichever the CPU resolves it to
        ("fp32", "openvino"),
        ("mixed", "openvino"),
        ("bf16", "torch"),
    ]:
        got = backends.resolve_backend("auto", device=cpu, precision=precision, compile=False)
        assert got == expected, precision
    meta = torch.device("meta")  # any non-CPU device keeps torch
    got = backends.resolve_backend("auto", device=meta, precision="fp32", compile=False)
    assert got == "torch"
    with mock.patch.object(backends, "backend_available", lambda name: False):
        got = backends.resolve_backend("auto", device=cpu, precision="auto", compile=False)
    assert got == "torch"  # OpenVINO not installed: the torch path, no error
    default = PretrainedCNNFeatures(input_size=32).fit(X)
    assert default.backend_ == "openvino"


def test_auto_default_gives_the_float32_torch_features():
    _needs("openvino")
    X, _, _ = blob_images(n=6)
    ref = PretrainedCNNFeatures(input_size=48, precision="fp32", backend="torch", cache=False)
    got = PretrainedCNNFeatures(input_size=48, precision="fp32", cache=False).fit(X).transform(X)
    assert _rel(got, ref.fit(X).transform(X)) < 1e-4


def test_compiled_copies_are_cached_per_network_state():
    _needs("openvino")
    X, _, _ = blob_images(n=3)
    kw = {"input_size": 32, "precision": "fp32", "backend": "openvino", "cache": False}
    a = PretrainedCNNFeatures(**kw).fit(X)
    a.transform(X)
    with mock.patch.object(backends, "OpenVINORunner", side_effect=AssertionError("rebuilt")):
        b = clone(a).fit(X)
        np.testing.assert_array_equal(b.transform(X), a.transform(X))
    assert b._fast is a._fast


def test_failed_backend_falls_back_to_torch_with_a_warning(monkeypatch):
    _needs("openvino")

    def broken(self, *args, **kwargs):
        raise backends.BackendError("forced failure")

    monkeypatch.setattr(backends.OpenVINORunner, "check", broken)
    clear_feature_cache()  # no compiled copy of an earlier test
    X, _, _ = blob_images(n=5)
    fe = PretrainedCNNFeatures(input_size=40, precision="fp32", backend="openvino").fit(X)
    with pytest.warns(InferenceBackendWarning, match="forced failure"):
        got = fe.transform(X)
    assert fe._effective_backend() == "torch"
    ref = PretrainedCNNFeatures(input_size=40, precision="fp32", backend="torch").fit(X)
    np.testing.assert_array_equal(got, ref.transform(X))


def test_backends_have_separate_cache_entries():
    _needs("openvino")
    X, _, _ = blob_images(n=4, seed=3)
    PretrainedCNNFeatures(input_size=32, precision="fp32", backend="torch").fit_transform(X)
    misses = feature_cache_info()["misses"]
    PretrainedCNNFeatures(input_size=32, precision="fp32", backend="openvino").fit_transform(X)
    assert feature_cache_info()["misses"] == misses + len(X)


def test_fitted_backend_estimator_pickles_and_rebuilds():
    _needs("openvino")
    X, _, _ = blob_images(n=4)
    fe = PretrainedCNNFeatures(input_size=32, precision="fp32", backend="openvino", cache=False)
    before = fe.fit(X).transform(X)
    assert fe._fast is not None
    back = pickle.loads(pickle.dumps(fe))
    assert back._fast is None
    np.testing.assert_array_equal(back.transform(X), before)
    assert back._fast.backend == "openvino"


def test_backend_runner_is_safe_from_threads():
    _needs("openvino")
    X, _, _ = blob_images(n=8)
    fe = PretrainedCNNFeatures(input_size=32, backend="openvino", cache=False, batch_size=8)
    ref = fe.fit(X).transform(X)
    out: list = [None] * 3

    def work(i):
        out[i] = fe.transform(X)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in out:
        np.testing.assert_array_equal(o, ref)


def test_explicit_backend_errors_name_the_parameter(monkeypatch):
    X, _, _ = blob_images(n=2)
    monkeypatch.setattr(backends, "backend_available", lambda name: name == "torch")
    with pytest.raises(ValueError, match=r"backend='openvino' needs the 'openvino' and 'onnx'"):
        PretrainedCNNFeatures(input_size=32, backend="openvino").fit(X)
    # without the package, "auto" quietly means torch
    with warnings.catch_warnings():
        warnings.simplefilter("error", InferenceBackendWarning)
        assert PretrainedCNNFeatures(input_size=32).fit(X).backend_ == "torch"


def test_onnxruntime_is_float32_only():
    _needs("onnxruntime")
    X, _, _ = blob_images(n=2)
    assert PretrainedCNNFeatures(input_size=32, backend="onnxruntime").fit(X).precision_ == (
        "fp32"
    )
    with pytest.raises(ValueError, match="float32 only"):
        PretrainedCNNFeatures(input_size=32, backend="onnxruntime", precision="mixed").fit(X)
    with pytest.raises(ValueError, match="compile=True"):
        PretrainedCNNFeatures(input_size=32, backend="onnxruntime", compile=True).fit(X)
