"""The weight moving-average callback (``skrtl._callbacks.WeightEMA``)."""

from __future__ import annotations

from functools import partial

import torch
from conftest import WeightSnapshots, square_images, trainable_weights
from skorch.callbacks import Callback

from skrtl import FineTuneClassifier
from skrtl._callbacks import WeightEMA


class LiveWeights(Callback):
    """Records the trainable weights after every training batch (before WeightEMA runs)."""

    def initialize(self):
        self.after_batch_ = []
        self.at_validation_ = []
        return self

    def on_batch_end(self, net, batch=None, training=None, **kwargs):
        if training:
            self.after_batch_.append(trainable_weights(net))


_data = partial(square_images, n=24)


def _expected_average(snapshots, start, decay):
    ema = [s.clone() for s in start]
    for t, snap in enumerate(snapshots, start=1):
        d = min(decay, (1.0 + t) / (10.0 + t))
        ema = [d * e + (1 - d) * s for e, s in zip(ema, snap)]
    return ema


def test_without_validation_the_network_ends_with_the_recursive_average():
    X, y = _data()
    rec = LiveWeights()

    class StartWeights(Callback):
        def on_train_begin(self, net, **kwargs):
            self.start_ = trainable_weights(net)

    start = StartWeights()
    clf = FineTuneClassifier(
        input_size=32,
        max_epochs=2,
        batch_size=8,
        n_estimators=1,
        validation_fraction=None,
        freeze_depth=8,
        random_state=0,
        callbacks=[("start", start), ("live", rec), ("ema", WeightEMA(decay=0.5))],
    )
    clf.fit(X, y)
    assert len(rec.after_batch_) == 6  # 24 images / 8 per batch x 2 epochs
    expected = _expected_average(rec.after_batch_, start.start_, 0.5)
    params = [p for p in clf.net_.module_.parameters() if p.requires_grad]
    last = rec.after_batch_[-1]
    assert not all(torch.allclose(p, w) for p, w in zip(params, last))  # not the live weights
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5)


def test_validation_sees_the_average_and_training_resumes_from_live_weights():
    X, y = _data()
    rec = LiveWeights()

    at_val, epoch_start = WeightSnapshots("end"), WeightSnapshots("begin")
    clf = FineTuneClassifier(
        input_size=32,
        max_epochs=2,
        batch_size=8,
        n_estimators=1,
        validation_fraction=0.25,
        early_stopping=False,
        freeze_depth=8,
        random_state=0,
        callbacks=[
            ("live", rec),
            ("ema", WeightEMA(decay=0.9)),
            ("epoch_start", epoch_start),  # after WeightEMA: sees what training starts from
            ("val", at_val),
        ],
    )
    clf.fit(X, y)
    n_batches = len(rec.after_batch_) // 2
    # at the end of epoch 1 the averaged weights are loaded, not the live ones
    live_1 = rec.after_batch_[n_batches - 1]
    assert not all(torch.allclose(a, b) for a, b in zip(at_val.weights_[0], live_1))
    # ... and epoch 2 starts from the live weights of the end of epoch 1
    for a, b in zip(epoch_start.weights_[1], live_1):
        torch.testing.assert_close(a, b)
    # the fitted network holds the final average
    params = [p for p in clf.net_.module_.parameters() if p.requires_grad]
    for p, w in zip(params, at_val.weights_[-1]):
        torch.testing.assert_close(p.detach(), w)
