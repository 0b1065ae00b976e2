"""Metadata routing through skrtl's meta-estimators (sample_weight and groups)."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_validate
from sklearn.pipeline import make_pipeline
from torch import nn

from skrtl import AdaBN, LabelShiftAdapter, TransferSearchCV
from skrtl._base import TorchNetworkMixin


class RecordingClassifier(ClassifierMixin, BaseEstimator):
    """Logistic regression that records the sample weights it was fitted with."""

    def fit(self, X, y, sample_weight=None):
        self.seen_weight_ = None if sample_weight is None else np.asarray(sample_weight)
        self.model_ = LogisticRegression().fit(X, y, sample_weight=sample_weight)
        self.classes_ = self.model_.classes_
        return self

    def predict_proba(self, X):
        return self.model_.predict_proba(X)

    def predict(self, X):
        return self.model_.predict(X)


class RecordingGroupKFold(GroupKFold):
    """GroupKFold remembering the groups it split."""

    seen = []

    def split(self, X, y=None, groups=None):
        RecordingGroupKFold.seen.append(None if groups is None else np.asarray(groups))
        return super().split(X, y, groups)


class TinyTorchFeatures(TorchNetworkMixin, TransformerMixin, BaseEstimator):
    """A one-BatchNorm network implementing the torch protocol; records its sample weights."""

    def fit(self, X, y=None, sample_weight=None):
        self.seen_weight_ = None if sample_weight is None else np.asarray(sample_weight)
        self.net_ = nn.Sequential(nn.BatchNorm1d(3)).eval()
        return self

    def _skrtl_torch_module(self):
        return self.net_

    def _skrtl_iter_inputs(self, X, batch_size=None):
        import torch

        x = torch.as_tensor(np.asarray(X, dtype=np.float32))
        yield x, np.arange(len(x))

    def transform(self, X):
        import torch

        with torch.no_grad():
            return self.net_(torch.as_tensor(np.asarray(X, dtype=np.float32))).numpy()


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    y = (X[:, 0] + 0.3 * rng.normal(size=60) > 0).astype(int)
    w = rng.uniform(0.5, 2.0, size=60)
    groups = np.repeat(np.arange(6), 10)
    return X, y, w, groups


def test_label_shift_adapter_routes_sample_weight_in_cross_validate(data):
    X, y, w, _ = data
    with sklearn.config_context(enable_metadata_routing=True):
        inner = RecordingClassifier().set_fit_request(sample_weight=True)
        ada = (
            LabelShiftAdapter(inner, cv=3, random_state=0)
            .set_fit_request(sample_weight=True)
            .set_score_request(sample_weight=False)
        )
        res = cross_validate(ada, X, y, cv=2, params={"sample_weight": w}, return_estimator=True)
    for est in res["estimator"]:
        assert est.estimator_.seen_weight_ is not None  # the weights reached the inner fit
    # without a request the weights are refused, as sklearn's routing requires
    with sklearn.config_context(enable_metadata_routing=True):
        with pytest.raises(Exception, match="sample_weight"):
            cross_validate(
                LabelShiftAdapter(RecordingClassifier(), cv=3), X, y, params={"sample_weight": w}
            )


def test_label_shift_adapter_weights_priors_and_routes_groups(data):
    X, y, w, groups = data
    plain = LabelShiftAdapter(RecordingClassifier(), cv=3, random_state=0).fit(X, y)
    weighted = LabelShiftAdapter(RecordingClassifier(), cv=3, random_state=0).fit(
        X, y, sample_weight=w
    )
    np.testing.assert_allclose(
        weighted.empirical_source_priors_[1], np.sum(w * (y == 1)) / w.sum(), rtol=1e-12
    )
    assert weighted.empirical_source_priors_[1] != plain.empirical_source_priors_[1]
    RecordingGroupKFold.seen = []
    with sklearn.config_context(enable_metadata_routing=True):
        LabelShiftAdapter(RecordingClassifier(), cv=RecordingGroupKFold(3)).fit(
            X, y, groups=groups
        )
    assert RecordingGroupKFold.seen and np.array_equal(RecordingGroupKFold.seen[-1], groups)


def test_transfer_search_cv_routes_sample_weight_and_groups(data):
    X, y, w, groups = data
    from sklearn.metrics import get_scorer

    RecordingGroupKFold.seen = []
    with sklearn.config_context(enable_metadata_routing=True):
        auc = get_scorer("roc_auc").set_score_request(sample_weight=False)
        est = RecordingClassifier().set_fit_request(sample_weight=True)
        search = TransferSearchCV(
            est,
            param_distributions={},
            n_trials=2,
            cv=RecordingGroupKFold(3),
            scoring=auc,
            random_state=0,
        )
        search.fit(X, y, groups=groups, sample_weight=w)
        assert search.best_estimator_.seen_weight_ is not None
        assert len(search.best_estimator_.seen_weight_) == len(y)
        assert any(g is not None and np.array_equal(g, groups) for g in RecordingGroupKFold.seen)
        # the case that failed before: cross_validate with routed sample weights
        res = cross_validate(
            TransferSearchCV(
                RecordingClassifier().set_fit_request(sample_weight=True),
                param_distributions={},
                n_trials=1,
                cv=2,
                scoring=auc,
                random_state=0,
            ),
            X,
            y,
            cv=2,
            scoring=auc,
            params={"sample_weight": w},
        )
    assert np.all(np.isfinite(res["test_score"]))


def test_adabn_routes_fit_params_to_the_inner_estimator(data):
    X, y, w, _ = data
    with sklearn.config_context(enable_metadata_routing=True):
        inner = TinyTorchFeatures().set_fit_request(sample_weight=True)
        ada = AdaBN(inner, site_column=None)  # AdaBN routes; the inner estimator requests
        ada.fit(X, y, sample_weight=w)
        assert np.array_equal(ada.estimator_.seen_weight_, w)
        pipe = make_pipeline(
            AdaBN(TinyTorchFeatures().set_fit_request(sample_weight=True), site_column=None),
            LogisticRegression()
            .set_fit_request(sample_weight=True)
            .set_score_request(sample_weight=True),
        )
        res = cross_validate(pipe, X, y, cv=2, params={"sample_weight": w})
    assert np.all(np.isfinite(res["test_score"]))
    # without routing, fit parameters are passed to the inner fit as they are
    assert np.array_equal(
        AdaBN(TinyTorchFeatures()).fit(X, sample_weight=w).estimator_.seen_weight_, w
    )
