"""The stochastic weight-averaging callback (``skrtl._callbacks.WeightSWA``)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from conftest import WeightSnapshots, square_images

from skrtl import FineTuneClassifier
from skrtl._callbacks import WeightSWA


def _bns(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _clf(callbacks, **kw):
    params = dict(
        input_size=32,
        max_epochs=4,
        batch_size=8,
        n_estimators=1,
        validation_fraction=0.25,
        early_stopping=False,
        freeze_depth=5,
        random_state=0,
        callbacks=callbacks,
    )
    return FineTuneClassifier(**{**params, **kw})


def test_network_ends_with_the_mean_of_the_last_half_and_fresh_bn_statistics():
    X, y = square_images(n=24)
    rec = WeightSnapshots("end")
    clf = _clf([("ends", rec), ("swa", WeightSWA(start=0.5))]).fit(X, y)
    module = clf.net_.module_
    assert len(rec.weights_) == 4
    # epochs 2, 3 and 4 of 4 (ceil(0.5 * 4) = 2, 1-based) are averaged with equal weights
    expected = [torch.stack(ws).mean(0) for ws in zip(*rec.weights_[1:])]
    params = [p for p in module.parameters() if p.requires_grad]
    assert not all(torch.allclose(p, w) for p, w in zip(params, rec.weights_[-1]))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5)
    trained = [m for m in _bns(module) if m.weight.requires_grad]
    frozen = [m for m in _bns(module) if not m.weight.requires_grad]
    assert trained and frozen
    # trained BatchNorms: statistics re-estimated by one pass over the 18 training images in
    # prediction batches of 16 (cumulative average: the counter restarts, counts 2 batches)
    assert {int(m.num_batches_tracked) for m in trained} == {2}
    assert all(m.momentum == 0.1 for m in trained)  # momentum restored
    ref = _clf([("ends", WeightSnapshots("end"))]).fit(X, y).net_.module_
    for a, b in zip(frozen, [m for m in _bns(ref) if not m.weight.requires_grad]):
        torch.testing.assert_close(a.running_mean, b.running_mean)  # pretrained values kept
    assert not module.training
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_allclose(again.predict_proba(X), proba, atol=1e-6)


def test_without_bn_update_the_live_statistics_stay_and_start_one_averages_the_last_epoch():
    X, y = square_images(n=24)
    rec = WeightSnapshots("end")
    swa = WeightSWA(start=1.0, update_bn=False)
    clf = _clf([("ends", rec), ("swa", swa)], max_epochs=2).fit(X, y)
    module = clf.net_.module_
    for p, w in zip([p for p in module.parameters() if p.requires_grad], rec.weights_[-1]):
        torch.testing.assert_close(p.detach(), w)
    trained = [m for m in _bns(module) if m.weight.requires_grad]
    assert all(int(m.num_batches_tracked) == 2 * 3 for m in trained)  # 2 epochs x 3 batches


@pytest.mark.parametrize("start", [0.25, 0.75])
def test_start_sets_the_first_averaged_epoch(start):
    X, y = square_images(n=24)
    rec = WeightSnapshots("end")
    clf = _clf([("ends", rec), ("swa", WeightSWA(start=start, update_bn=False))]).fit(X, y)
    first = int(np.ceil(start * 4))
    expected = [torch.stack(ws).mean(0) for ws in zip(*rec.weights_[first - 1 :])]
    params = [p for p in clf.net_.module_.parameters() if p.requires_grad]
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5)
