"""Tests of AdaBN (BatchNorm statistics re-estimation per target domain).

The mechanics are tested on a tiny conv + BatchNorm network wrapped in a stand-in estimator that
implements the skrtl torch hooks; the real CNN estimators are tested at the end when present.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
import sklearn
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, cross_validate
from sklearn.pipeline import make_pipeline
from torch import nn

from skrtl._adabn import AdaBN, bn_layers, reestimate_bn_stats
from skrtl._imaging import make_image_frame

EPS = 1e-5


class TinyNet(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(1, eps=EPS)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.bn1 = nn.BatchNorm2d(3, eps=EPS)

    def forward(self, x):
        h = self.drop(self.conv(self.bn0(x)))
        return torch.relu(self.bn1(h)).mean(dim=(2, 3))


def _as_tensor(X):
    imgs = list(X["image"]) if isinstance(X, pd.DataFrame) else list(np.asarray(X))
    return torch.from_numpy(np.stack(imgs).astype(np.float32))[:, None]


class TinyFeatures(TransformerMixin, BaseEstimator):
    """Stand-in for PretrainedCNNFeatures implementing the skrtl torch hooks."""

    def __init__(self, *, seed=0, dropout=0.0, batch_size=4):
        self.seed = seed
        self.dropout = dropout
        self.batch_size = batch_size

    def fit(self, X, y=None):
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.net_ = TinyNet(self.dropout).eval()
            with torch.no_grad():
                for _, m in bn_layers(self.net_):  # "ImageNet" statistics
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
        self.n_invalidations_ = 0
        return self

    def _skrtl_torch_module(self):
        return self.net_

    def _skrtl_iter_inputs(self, X, batch_size=None):
        x = _as_tensor(X)
        bs = batch_size or self.batch_size
        for start in range(0, x.shape[0], bs):
            idx = np.arange(start, min(start + bs, x.shape[0]))
            yield x[idx], idx

    def _skrtl_invalidate_cache(self):
        self.n_invalidations_ += 1

    def transform(self, X):
        with torch.no_grad():
            return self.net_(_as_tensor(X)).numpy().astype(np.float64)


class TinyClassifier(ClassifierMixin, TinyFeatures):
    def fit(self, X, y):
        super().fit(X)
        self.classes_ = np.unique(y)
        self.w_ = np.linspace(-1, 1, 3 * len(self.classes_)).reshape(3, -1)
        return self

    def predict_proba(self, X):
        z = self.transform(X) @ self.w_
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(1)]


def _imgs(n, loc=0.0, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.normal(size=(n, 6, 6))).astype(np.float32)


def _expected_bn1(net, x):
    """Moments of bn1's input when bn0 normalises with the batch's own statistics."""
    with torch.no_grad():
        mu = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        w = net.bn0.weight.view(1, -1, 1, 1)
        b = net.bn0.bias.view(1, -1, 1, 1)
        h = net.conv((x - mu) / torch.sqrt(var + EPS) * w + b)
        return h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=True)


def _params(net):
    return {k: v.detach().clone() for k, v in net.named_parameters()}


# --------------------------------------------------------------------------------------------
def test_bn_stats_equal_target_moments_and_weights_untouched():
    src, tgt = _imgs(8), _imgs(10, loc=3.0, scale=2.0, seed=1)
    ada = AdaBN(TinyFeatures(batch_size=100), source_stats="recompute", site_column=None).fit(src)
    net = ada.estimator_.net_
    before = _params(net)
    ada.adapt(tgt)
    st = ada.bn_stats_["__target__"]
    x = torch.from_numpy(tgt)[:, None]
    np.testing.assert_allclose(st["bn0"][0].numpy(), [tgt.mean()], rtol=1e-5)
    np.testing.assert_allclose(st["bn0"][1].numpy(), [tgt.var(ddof=1)], rtol=1e-5)
    m1, v1 = _expected_bn1(net, x)
    np.testing.assert_allclose(st["bn1"][0].numpy(), m1.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(st["bn1"][1].numpy(), v1.numpy(), rtol=1e-4)
    # weights untouched, network back on the source statistics after adapt and transform
    ada.transform(tgt)
    after = _params(net)
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(before[k], after[k], rtol=0, atol=0)
    torch.testing.assert_close(net.bn0.running_mean, ada.bn_stats_["__source__"]["bn0"][0])
    assert not net.training and not net.bn0.training


def test_pooled_moments_do_not_depend_on_batch_size():
    tgt = _imgs(11, loc=-2.0, scale=0.5, seed=3)
    stats = []
    for bs in (2, 5, 100):
        ada = AdaBN(TinyFeatures(), source_stats="recompute", site_column=None, batch_size=bs).fit(
            _imgs(4)
        )
        ada.adapt(tgt)
        stats.append(ada.bn_stats_["__target__"]["bn0"])
    for mean, var in stats:
        np.testing.assert_allclose(mean.numpy(), [tgt.mean()], rtol=1e-5)
        np.testing.assert_allclose(var.numpy(), [tgt.var(ddof=1)], rtol=1e-5)


def test_dropout_stays_in_eval_mode():
    tgt = _imgs(6, loc=1.0, seed=4)
    ada = AdaBN(
        TinyFeatures(dropout=0.9, batch_size=64), source_stats="recompute", site_column=None
    ).fit(_imgs(4))
    ada.adapt(tgt)
    m1, v1 = _expected_bn1(ada.estimator_.net_, torch.from_numpy(tgt)[:, None])
    np.testing.assert_allclose(ada.bn_stats_["__target__"]["bn1"][0].numpy(), m1, rtol=1e-4)
    np.testing.assert_allclose(ada.bn_stats_["__target__"]["bn1"][1].numpy(), v1, rtol=1e-4)


def test_source_stats_recompute_vs_keep():
    src = _imgs(8, loc=5.0)
    rec = AdaBN(TinyFeatures(), source_stats="recompute").fit(src)
    np.testing.assert_allclose(rec.bn_stats_["__source__"]["bn0"][0], [src.mean()], rtol=1e-5)
    keep = AdaBN(TinyFeatures(), source_stats="keep").fit(src)
    ref = TinyFeatures().fit(src).net_.bn0.running_mean
    torch.testing.assert_close(keep.bn_stats_["__source__"]["bn0"][0], ref)


def test_per_domain_statistics_and_routing_by_site():
    src = make_image_frame(_imgs(6), sites=["A"] * 6)
    b, c = _imgs(5, loc=4.0, seed=5), _imgs(7, loc=-3.0, scale=3.0, seed=6)
    tgt = make_image_frame(np.concatenate([b, c]), sites=["B"] * 5 + ["C"] * 7)
    ada = AdaBN(TinyFeatures(batch_size=64), source_stats="recompute").fit(src, X_target=tgt)
    assert sorted(ada.domains_) == ["B", "C"]
    np.testing.assert_allclose(ada.bn_stats_["B"]["bn0"][0], [b.mean()], rtol=1e-5)
    np.testing.assert_allclose(ada.bn_stats_["C"]["bn0"][1], [c.var(ddof=1)], rtol=1e-5)
    # a mixed frame is routed row by row; order preserved
    mixed = pd.concat([tgt.iloc[[0, 6]], src.iloc[[1]], tgt.iloc[[7, 2]]])
    out = ada.transform(mixed)
    only_b = ada.transform(tgt.iloc[[0, 2]])
    only_c = ada.transform(tgt.iloc[[6, 7]])
    only_a = ada.transform(src.iloc[[1]])
    np.testing.assert_allclose(out[[0, 4]], only_b, rtol=1e-5)
    np.testing.assert_allclose(out[[1, 3]], only_c, rtol=1e-5)
    np.testing.assert_allclose(out[[2]], only_a, rtol=1e-5)
    # the adapted site B features differ from unadapted ones (source statistics)
    unadapted = AdaBN(TinyFeatures(batch_size=64)).fit(src)
    unadapted.set_params(unseen="source")
    assert not np.allclose(unadapted.transform(tgt.iloc[[0, 2]]), only_b)
    assert ada.estimator_.n_invalidations_ > 0


def test_unseen_site_error_or_source():
    src = make_image_frame(_imgs(4), sites=["A"] * 4)
    ada = AdaBN(TinyFeatures()).fit(src, X_target=make_image_frame(_imgs(4), sites=["B"] * 4))
    new = make_image_frame(_imgs(2), sites=["Z", "Z"])
    with pytest.raises(ValueError, match=r"sites \['Z'\] were neither adapted"):
        ada.transform(new)
    ada.set_params(unseen="source")
    np.testing.assert_allclose(
        ada.transform(new), ada.transform(src.iloc[:2].assign(image=new["image"].to_numpy()))
    )
    with pytest.raises(ValueError, match="has no site column"):
        ada.transform(_imgs(2))


def test_momentum_one_gives_last_batch_statistics():
    tgt = _imgs(8, loc=2.0, seed=7)
    ada = AdaBN(
        TinyFeatures(), source_stats="recompute", site_column=None, momentum=1.0, batch_size=4
    ).fit(_imgs(4))
    ada.adapt(tgt)
    np.testing.assert_allclose(ada.bn_stats_["__target__"]["bn0"][0], [tgt[4:].mean()], rtol=1e-5)
    ada2 = AdaBN(
        TinyFeatures(), source_stats="recompute", site_column=None, n_batches=1, batch_size=4
    ).fit(_imgs(4))
    ada2.adapt(tgt)
    np.testing.assert_allclose(ada2.bn_stats_["__target__"]["bn0"][0], [tgt[:4].mean()], rtol=1e-5)


def test_frozen_batchnorm_is_reestimated_in_place():
    from torchvision.ops.misc import FrozenBatchNorm2d

    net = nn.Sequential(FrozenBatchNorm2d(1), nn.Conv2d(1, 2, 1), FrozenBatchNorm2d(2))
    x = torch.randn(16, 1, 4, 4) * 2 + 1
    reestimate_bn_stats(net, [x])
    assert isinstance(net[0], FrozenBatchNorm2d)
    torch.testing.assert_close(net[0].running_mean, x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(net[0].running_var, x.var(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    # the second layer saw batch-normalised inputs
    with torch.no_grad():
        h = net[1]((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5))
    torch.testing.assert_close(net[2].running_mean, h.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_classifier_wrapper_and_frozen_estimator_not_modified():
    from sklearn.frozen import FrozenEstimator

    src, y = _imgs(8), np.array([0, 1] * 4)
    clf = TinyClassifier().fit(src, y)
    ref_mean = clf.net_.bn0.running_mean.clone()
    ada = AdaBN(FrozenEstimator(clf), site_column=None, source_stats="keep").fit(src, y)
    ada.adapt(_imgs(6, loc=3.0))
    proba = ada.predict_proba(src)
    assert proba.shape == (8, 2) and np.allclose(proba.sum(1), 1)
    assert list(ada.classes_) == [0, 1]
    assert ada.predict(src).shape == (8,)
    torch.testing.assert_close(clf.net_.bn0.running_mean, ref_mean)
    assert not np.allclose(proba, clf.predict_proba(src))


@pytest.mark.parametrize("source_stats", ["recompute", "match"])
def test_inside_cross_validate_source_stats_from_training_fold_only(source_stats):
    imgs = _imgs(12, loc=1.0)
    imgs[::2] += 10.0  # folds differ a lot
    y = np.array([0, 1] * 6)
    seen = []

    class Spy(AdaBN):
        def fit(self, X, y=None, **kw):
            super().fit(X, y, **kw)
            if self.source_stats == "recompute":
                got = self.bn_stats_["__source__"]["bn0"][0]
            else:  # source moments measured for matching
                got = self._source_moments["bn0"][0]
            seen.append((float(got), float(np.mean(X))))
            return self

    pipe = make_pipeline(
        Spy(TinyFeatures(), site_column=None, source_stats=source_stats), LogisticRegression()
    )
    cross_validate(
        pipe, imgs, y, cv=KFold(3), params={"spy__X_target": _imgs(5, loc=-1.0, seed=9)}
    )
    assert len(seen) == 3
    for got, expected in seen:
        assert got == pytest.approx(expected, rel=1e-5)


def test_estimator_without_hooks_is_rejected():
    with pytest.raises(TypeError, match="_skrtl_torch_module"):
        AdaBN(LogisticRegression()).fit(np.zeros((4, 2)), [0, 1, 0, 1])


def _bn_outputs(net, x):
    """Output of bn0 and bn1 (eval mode, current statistics)."""
    outs = {}
    hooks = [
        getattr(net, n).register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o))
        for n in ("bn0", "bn1")
    ]
    with torch.no_grad():
        net.eval()(x)
    for h in hooks:
        h.remove()
    return outs


def test_match_gives_target_the_source_output_moments_and_keeps_source():
    src, tgt = _imgs(9, loc=1.0, seed=11), _imgs(7, loc=-2.0, scale=3.0, seed=12)
    ada = AdaBN(TinyFeatures(batch_size=64), site_column=None).fit(src)  # source_stats="match"
    net = ada.estimator_.net_
    original = TinyFeatures().fit(src).net_
    for name, (mean, var) in ada.bn_stats_["__source__"].items():  # network statistics kept
        torch.testing.assert_close(mean, getattr(original, name).running_mean)
        torch.testing.assert_close(var, getattr(original, name).running_var)
    f_src = ada.transform(src)
    np.testing.assert_allclose(f_src, original(_as_tensor(src)).detach().numpy(), rtol=1e-5)
    ada.adapt(tgt)
    xs, xt = _as_tensor(src), _as_tensor(tgt)
    ref = _bn_outputs(net, xs)  # source, source statistics (loaded back after adapt)
    for name, (mean, var) in ada.bn_stats_["__target__"].items():
        getattr(net, name).running_mean.copy_(mean)
        getattr(net, name).running_var.copy_(var)
    got = _bn_outputs(net, xt)
    for name in ("bn0", "bn1"):  # same per-channel output moments, layer after layer
        torch.testing.assert_close(
            got[name].mean(dim=(0, 2, 3)), ref[name].mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            got[name].std(dim=(0, 2, 3), unbiased=False),
            ref[name].std(dim=(0, 2, 3), unbiased=False),
            rtol=1e-4,
            atol=1e-5,
        )
    assert not np.allclose(ada.transform(tgt), original(xt).detach().numpy())


def test_sample_domain_overrides_site_column_and_is_validated():
    src, b, c = _imgs(6), _imgs(5, loc=4.0, seed=5), _imgs(7, loc=-3.0, scale=3.0, seed=6)
    tgt = np.concatenate([b, c])
    dom = np.array(["B"] * 5 + ["C"] * 7)
    by_frame = AdaBN(TinyFeatures(batch_size=64)).fit(
        make_image_frame(src, sites=["A"] * 6), X_target=make_image_frame(tgt, sites=dom)
    )
    by_route = AdaBN(TinyFeatures(batch_size=64)).fit(
        src, sample_domain=["A"] * 6, X_target=tgt, target_domain=dom
    )
    assert by_route.source_sites_ == ["A"] and sorted(by_route.domains_) == ["B", "C"]
    for d in ("B", "C"):
        torch.testing.assert_close(by_route.bn_stats_[d]["bn0"], by_frame.bn_stats_[d]["bn0"])
    order = [0, 6, 2, 11]
    np.testing.assert_allclose(
        by_route.transform(tgt[order], sample_domain=dom[order]),
        by_frame.transform(make_image_frame(tgt[order], sites=dom[order])),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match=r"sample_domain must have shape \(4,\)"):
        by_route.transform(tgt[:4], sample_domain=["B"] * 3)
    with pytest.raises(ValueError, match="target_domain was given without X_target"):
        AdaBN(TinyFeatures()).fit(src, target_domain=["B"] * 6)


def test_metadata_routing_in_pipeline_local_config():
    src, y = _imgs(8), np.array([0, 1] * 4)
    tgt = np.concatenate([_imgs(4, loc=3.0, seed=2), _imgs(4, loc=-2.0, seed=3)])
    tdom = np.array(["B"] * 4 + ["C"] * 4)
    with sklearn.config_context(enable_metadata_routing=True):
        ada = AdaBN(TinyFeatures(batch_size=64))
        # fit and transform must agree on sample_domain (sklearn's fit_transform rule)
        ada.set_fit_request(X_target=True, target_domain=True, sample_domain=True)
        ada.set_transform_request(sample_domain=True)
        pipe = make_pipeline(ada, LogisticRegression())
        pipe.fit(src, y, X_target=tgt, target_domain=tdom)
        proba = pipe.predict_proba(tgt, sample_domain=tdom)
        assert sorted(pipe[0].domains_) == ["B", "C"]
        feats = pipe[0].transform(tgt, sample_domain=tdom)
    np.testing.assert_allclose(proba, pipe[-1].predict_proba(feats))
    assert not sklearn.get_config()["enable_metadata_routing"]


def _timm_tiny(name):
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=0).eval()


@pytest.mark.parametrize("name", ["resnet10t", "tf_efficientnet_lite0"])
def test_timm_frozen_batchnorm_gives_same_statistics_as_batchnorm(name):
    """timm's freeze_batch_norm_2d (FrozenBatchNorm2d / FrozenBatchNormAct2d) is handled."""
    import copy

    from timm.layers import freeze_batch_norm_2d

    net = _timm_tiny(name).double()  # float64: compare the maths, not float32 rounding
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in bn_layers(net):
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen, dtype=m.weight.dtype))
            m.bias.copy_(torch.rand(m.bias.shape, generator=gen, dtype=m.bias.dtype) - 0.5)
    frozen = freeze_batch_norm_2d(copy.deepcopy(net))
    kinds = {type(m).__name__ for _, m in bn_layers(frozen)}
    assert kinds and all(k.startswith("FrozenBatchNorm") for k in kinds)
    assert len(bn_layers(frozen)) == len(bn_layers(net))
    x = 2.0 + 0.5 * torch.randn(6, 3, 32, 32, generator=gen, dtype=torch.float64)
    before = {k: v.clone() for k, v in frozen.state_dict().items() if "running" not in k}
    reestimate_bn_stats(net, [x[:3], x[3:]])
    reestimate_bn_stats(frozen, [x[:3], x[3:]])
    ref = dict(bn_layers(net))
    for lname, m in bn_layers(frozen):
        for got, want in [
            (m.running_mean, ref[lname].running_mean),
            (m.running_var, ref[lname].running_var),
        ]:
            assert (got - want).abs().max() <= 1e-8 * want.abs().max(), lname
    after = frozen.state_dict()
    for k, v in before.items():  # weights and (buffer) affine parameters untouched
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    stem = bn_layers(frozen)[0][1]  # re-estimated: no longer the initial (0, 1) statistics
    assert stem.running_mean.abs().max() > 1e-3 and (stem.running_var - 1).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# real estimators (present once the feature / fine-tuning modules exist)
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(
    importlib.util.find_spec("skrtl._features") is None, reason="skrtl._features not present"
)
def test_with_pretrained_cnn_features():
    from skrtl._features import PretrainedCNNFeatures

    rng = np.random.default_rng(0)
    src = rng.random((6, 32, 32)).astype(np.float32)
    tgt = (0.3 * rng.random((5, 32, 32)) ** 2 + 0.6).astype(np.float32)
    fe = PretrainedCNNFeatures(input_size=64, precision="fp32", cache=False)
    ada = AdaBN(fe, site_column=None).fit(src)
    module = ada._skrtl_torch_module()
    before = _params(module)
    f_unadapted = ada.transform(tgt)
    ada.adapt(tgt)
    f_adapted = ada.transform(tgt)
    for k, v in _params(module).items():
        torch.testing.assert_close(before[k], v, rtol=0, atol=0)
    assert f_adapted.shape == f_unadapted.shape
    assert not np.allclose(f_adapted, f_unadapted)
    name, first = bn_layers(module)[0]  # the module is back on the source statistics
    torch.testing.assert_close(first.running_mean, ada.bn_stats_["__source__"][name][0])
    assert not torch.allclose(ada.bn_stats_["__target__"][name][0], first.running_mean)
    # end to end: the transformer's features are those of the network with target statistics
    _load = {n: m for n, m in bn_layers(module)}
    with torch.no_grad():
        for n, (mean, var) in ada.bn_stats_["__target__"].items():
            _load[n].running_mean.copy_(mean)
            _load[n].running_var.copy_(var)
        x = torch.cat([b for b, _ in ada.estimator_._skrtl_iter_inputs(tgt)])
        direct = module.forward_features(x).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(f_adapted, direct, rtol=1e-3, atol=1e-3 * np.abs(direct).max())


@pytest.mark.skipif(
    importlib.util.find_spec("skrtl._features") is None, reason="skrtl._features not present"
)
def test_set_output_pandas_keeps_row_order_and_names():
    from skrtl._features import PretrainedCNNFeatures

    rng = np.random.default_rng(0)
    X = make_image_frame(rng.random((6, 32, 32)).astype(np.float32), sites=list("AAABBB"))
    ada = AdaBN(PretrainedCNNFeatures(input_size=32, precision="fp32", cache=False))
    out = ada.set_output(transform="pandas").fit_transform(X.iloc[:3], X_target=X.iloc[3:])
    assert list(out.columns) == list(ada.get_feature_names_out())
    mixed = ada.transform(X.iloc[[4, 0, 5]])
    assert list(mixed.index) == [4, 0, 5]
    np.testing.assert_allclose(
        mixed.loc[[0]].to_numpy(), out.loc[[0]].to_numpy(), rtol=1e-4, atol=1e-5
    )


@pytest.mark.skipif(
    importlib.util.find_spec("skrtl._finetune") is None, reason="skrtl._finetune not present"
)
def test_wraps_fitted_finetune_classifier_via_frozen_estimator():
    from sklearn.frozen import FrozenEstimator

    from skrtl._finetune import FineTuneClassifier

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 6)
    src = (rng.random((12, 32, 32)) + 0.3 * y[:, None, None]).astype(np.float32)
    tgt = (0.5 * rng.random((8, 32, 32)) + 2.0).astype(np.float32)  # brighter scanner
    clf = FineTuneClassifier(
        strategy="finetune", max_epochs=1, batch_size=6, input_size=32, random_state=0
    ).fit(src, y)
    module = clf._skrtl_torch_module()
    ref_stats = {k: v.clone() for k, v in module.state_dict().items()}
    ada = AdaBN(FrozenEstimator(clf), site_column=None, source_stats="keep").fit(src, y)
    p_unadapted = ada.predict_proba(tgt)
    np.testing.assert_allclose(p_unadapted, clf.predict_proba(tgt), rtol=1e-5, atol=1e-6)
    ada.adapt(tgt)
    p_adapted = ada.predict_proba(tgt)
    assert p_adapted.shape == (8, 2) and not np.allclose(p_adapted, p_unadapted)
    assert list(ada.classes_) == [0, 1]
    # the user's fitted classifier is never modified
    for k, v in clf._skrtl_torch_module().state_dict().items():
        torch.testing.assert_close(v, ref_stats[k], rtol=0, atol=0)
    adapted_module = ada._skrtl_torch_module()
    assert adapted_module is not clf._skrtl_torch_module()


def test_matched_stats_never_divide_by_zero():
    # a target channel almost constant next to a wide reference channel: stretching it would
    # make running_var + eps round to zero (infinite features); it only gets its mean shifted
    from skrtl._adabn import _matched_stats

    eps = 1e-3
    mean_t, var_t = torch.zeros(3), torch.tensor([1e-8, 1e-4, 1.0])
    ref = (torch.zeros(3), torch.tensor([100.0, 100.0, 1.0]))
    cur = (torch.zeros(3), torch.ones(3))
    _, var = _matched_stats(mean_t, var_t, ref, cur, eps)
    denom = torch.sqrt(var + eps)
    assert torch.isfinite(denom).all() and (denom > 1e-3).all()
    assert denom[0] == pytest.approx(float(torch.sqrt(torch.tensor(1.0 + eps))), rel=1e-5)
    # an ordinary channel is still matched: target sd 1 = reference sd 1
    assert denom[2] == pytest.approx(float(torch.sqrt(torch.tensor(1.0 + eps))), rel=1e-5)
