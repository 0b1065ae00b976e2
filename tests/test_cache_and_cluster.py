"""Persistent feature caches (shared by processes) and scale-out through joblib / Dask."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import joblib
import numpy as np
import pytest
from _cohort_fixtures import write_cohort
from conftest import blob_images

import skrtl._radiomics as radiomics_module
from skrtl import (
    PretrainedCNNFeatures,
    RadiomicsFeatures,
    clear_feature_cache,
    extract_cohort,
    make_image_frame,
    read_cohort,
)
from skrtl._inference import InferenceRunner
from skrtl.utils import open_disk_cache

FAST = dict(input_size=32, precision="fp32", batch_size=4, backend="torch")


@pytest.fixture
def count_forwards(monkeypatch):
    calls = {"n": 0}
    orig = InferenceRunner.__call__

    def counting(self, x, pad_to=None):
        calls["n"] += int(x.shape[0])
        return orig(self, x, pad_to=pad_to)

    monkeypatch.setattr(InferenceRunner, "__call__", counting)
    return calls


def _frame(n=12):
    X, _, masks = blob_images(n=n)
    return make_image_frame(X, masks=masks, spacing=(0.7, 0.7))


def test_disk_cache_serves_a_new_estimator_without_running_the_network(tmp_path, count_forwards):
    frame = _frame()
    first = PretrainedCNNFeatures(cache=False, cache_dir=tmp_path, **FAST).fit(frame)
    ref = first.transform(frame)
    assert count_forwards["n"] == len(frame)
    clear_feature_cache()
    second = PretrainedCNNFeatures(cache=True, cache_dir=tmp_path, **FAST).fit(frame)
    np.testing.assert_array_equal(second.transform(frame), ref)
    assert count_forwards["n"] == len(frame)  # nothing recomputed
    # other settings have their own entries
    PretrainedCNNFeatures(cache=False, cache_dir=tmp_path, pooling="max", **FAST).fit(
        frame
    ).transform(frame)
    assert count_forwards["n"] == 2 * len(frame)


_READER = textwrap.dedent(
    """
    import sys, json
    import numpy as np
    from skrtl import PretrainedCNNFeatures, make_image_frame
    from skrtl._inference import InferenceRunner
    calls = {"n": 0}
    orig = InferenceRunner.__call__
    def counting(self, x, pad_to=None):
        calls["n"] += int(x.shape[0])
        return orig(self, x, pad_to=pad_to)
    InferenceRunner.__call__ = counting
    data = np.load(sys.argv[2])
    frame = make_image_frame(data["X"], masks=data["masks"], spacing=(0.7, 0.7))
    est = PretrainedCNNFeatures(input_size=32, precision="fp32", batch_size=4, cache=False,
                                backend="torch",
                                cache_dir=sys.argv[1]).fit(frame)
    out = est.transform(frame)
    np.save(sys.argv[3], out)
    print(json.dumps(calls))
    """
)


def test_a_second_process_reads_the_features_and_concurrent_writers_are_safe(tmp_path):
    X, _, masks = blob_images(n=12)
    np.savez(tmp_path / "data.npz", X=X, masks=masks)
    cache = tmp_path / "cache"

    def run(out, wait=True):
        proc = subprocess.Popen(
            [sys.executable, "-c", _READER, str(cache), str(tmp_path / "data.npz"), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return proc

    writers = [run(tmp_path / f"w{i}.npy") for i in range(2)]  # two writers at once
    for p in writers:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    reader = run(tmp_path / "r.npy")
    out, err = reader.communicate(timeout=300)
    assert reader.returncode == 0, err[-2000:]
    assert '"n": 0' in out  # the third process ran no forward pass
    ref = np.load(tmp_path / "w0.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "w1.npy"), ref)
    np.testing.assert_array_equal(np.load(tmp_path / "r.npy"), ref)


def test_disk_cache_is_bounded(tmp_path):
    cache = open_disk_cache(tmp_path, max_mb=0.2)
    for i in range(400):
        cache.put_array(f"k{i}".encode(), np.full(1280, i, dtype=np.float32))  # 5 KiB each
    info = cache.info()
    assert info["bytes"] <= 1.5 * info["max_bytes"] and info["entries"] < 400


@pytest.mark.skipif(importlib.util.find_spec("radiomics") is None, reason="no PyRadiomics")
def test_radiomics_disk_cache_skips_pyradiomics_on_a_rerun(tmp_path, monkeypatch):
    frame = _frame(6)
    rad = RadiomicsFeatures(features=["firstorder"], cache_dir=tmp_path)
    ref = rad.fit_transform(frame)
    calls = {"n": 0}
    real = radiomics_module._extract_one

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(radiomics_module, "_extract_one", counting)
    again = RadiomicsFeatures(features=["firstorder"], cache_dir=tmp_path).fit(frame)
    np.testing.assert_array_equal(again.transform(frame), ref)
    assert calls["n"] == 0  # fit (names from the first sample) and transform: all cached


def test_joblib_parallel_equals_serial():
    frame = _frame(16)
    serial = PretrainedCNNFeatures(cache=False, **FAST).fit(frame).transform(frame)
    # loky: worker processes, so the estimator and the rows are pickled to them
    with joblib.parallel_config(backend="loky"):
        par = PretrainedCNNFeatures(cache=False, n_jobs=2, **FAST).fit(frame).transform(frame)
    # a worker process runs torch with its own thread count, which changes the order of
    # the float sums inside a convolution: equal up to rounding, not bit for bit
    np.testing.assert_allclose(par, serial, rtol=1e-4, atol=1e-4)
    assert par.shape == serial.shape and not np.array_equal(par, np.zeros_like(par))


@pytest.mark.skipif(importlib.util.find_spec("distributed") is None, reason="no dask.distributed")
def test_a_local_dask_cluster_of_two_workers_gives_the_serial_results(tmp_path):
    from distributed import Client, LocalCluster

    frame = _frame(16)
    csv = write_cohort(tmp_path / "data", n=4, second_label=())
    cohort = read_cohort(csv, image="Image", mask="Mask", id="patient")
    fe = PretrainedCNNFeatures(cache=False, **FAST).fit(frame)
    rad = RadiomicsFeatures(features=["firstorder"], label=1).fit(cohort)
    ex = dict(input_size=32, precision="fp32", id_column="patient", verbose=0)
    with (
        # two in-process workers keep the test fast; the loky test above covers pickling
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
        joblib.parallel_config(backend="dask"),
    ):
        assert len(client.scheduler_info()["workers"]) == 2
        par = fe.set_params(n_jobs=2).transform(frame)
        rad_par = rad.set_params(n_jobs=2).transform(cohort)
        ex_par = extract_cohort(csv, tmp_path / "par.csv", n_jobs=2, **ex)
    np.testing.assert_allclose(
        par, fe.set_params(n_jobs=None).transform(frame), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_array_equal(rad_par, rad.set_params(n_jobs=None).transform(cohort))
    ex_serial = extract_cohort(csv, tmp_path / "serial.csv", **ex)
    cols = [c for c in ex_serial.features.columns if c.startswith("cnn_")]
    np.testing.assert_allclose(
        ex_par.features[cols].to_numpy(), ex_serial.features[cols].to_numpy(), rtol=1e-4, atol=1e-4
    )
