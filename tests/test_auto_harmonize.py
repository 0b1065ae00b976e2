"""Tests of AutoHarmonizer (unsupervised choice of a harmonizer) and of the shift checks.

The selector runs on a tiny conv + BatchNorm network implementing the skrtl torch hooks, so
that every candidate (AdaBN included) is fitted in well under a second.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.model_selection import StratifiedKFold, cross_validate
from sklearn.pipeline import make_pipeline
from torch import nn

from skrtl import (
    AdaBN,
    AutoHarmonizer,
    ComBatHarmonizer,
    HarmonizationWarning,
    HistogramMatcher,
    make_image_frame,
)
from skrtl._base import check_shift_change, measure_shift


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(1)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv(self.bn0(x))))
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


def _tensor(X):
    imgs = list(X["image"]) if isinstance(X, pd.DataFrame) else list(np.asarray(X))
    return torch.from_numpy(np.stack(imgs).astype(np.float32))[:, None]


class NetFeatures(TransformerMixin, BaseEstimator):
    """A small CNN feature transformer implementing the skrtl torch network protocol."""

    def __init__(self, *, seed=0):
        self.seed = seed

    def fit(self, X, y=None):
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.net_ = _Net().eval()
        return self

    def _skrtl_torch_module(self):
        return self.net_

    def _skrtl_iter_inputs(self, X, batch_size=None):
        x = _tensor(X)
        bs = batch_size or 16
        for start in range(0, x.shape[0], bs):
            idx = np.arange(start, min(start + bs, x.shape[0]))
            yield x[idx], idx

    def transform(self, X):
        with torch.no_grad():
            return self.net_(_tensor(X)).numpy().astype(np.float64)


class StatFeatures(TransformerMixin, BaseEstimator):
    """Image statistics: a feature transformer without a network (no AdaBN candidates)."""

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        imgs = np.stack(list(X["image"]) if isinstance(X, pd.DataFrame) else list(X))
        flat = imgs.reshape(len(imgs), -1)
        centre = imgs[:, 3:5, 3:5].reshape(len(imgs), -1).mean(1)
        return np.c_[flat.mean(1), flat.std(1), centre, np.percentile(flat, 90, axis=1)]


def _images(n, *, seed, scale=1.0, offset=0.0):
    """8x8 images whose class is a bright centre; returns (images, labels)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    imgs = rng.normal(size=(n, 8, 8))
    imgs[:, 3:5, 3:5] += 2.0 * y[:, None, None]
    return (scale * imgs + offset).astype(np.float32), y


@pytest.fixture(scope="module")
def data():
    Xs, ys = _images(80, seed=0)
    Xt, yt = _images(60, seed=1, scale=0.4, offset=3.0)  # another scanner: gain and offset
    Xn, yn = _images(60, seed=2)  # the same scanner
    return {
        "source": make_image_frame(Xs, sites=["A"] * len(Xs)),
        "y": ys,
        "target": make_image_frame(Xt, sites=["B"] * len(Xt)),
        "y_target": yt,
        "same": make_image_frame(Xn, sites=["C"] * len(Xn)),
        "y_same": yn,
    }


def _auto(**kw):
    kw.setdefault("random_state", 0)
    kw.setdefault("cv", 3)
    return AutoHarmonizer(NetFeatures(), **kw)


@pytest.fixture(scope="module")
def fitted(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonizationWarning)
        return _auto(keep_candidates=True).fit(data["source"], data["y"], X_target=data["target"])


# --------------------------------------------------------------------------------------------
def test_fitted_attributes_and_criteria_table(fitted, data):
    auto = fitted
    table = auto.scores_
    assert list(table.index) == ["none", "consensus", "adabn", "combat", "histogram", "coral"]
    assert (table["status"] == "ok").all()
    for col in ("source_auc", "mmd", "mmd_p", "agreement", "corroboration", "verdict", "chosen"):
        assert col in table.columns
    assert table.loc["none", "agreement"] == pytest.approx(1.0)
    assert table["verdict"].str.len().gt(0).all()
    assert table["chosen"].sum() == 1 and table.loc[auto.choice_, "chosen"]
    assert auto.choice_ in table.index
    assert isinstance(auto.reason_, str) and auto.choice_ in auto.reason_
    assert auto.source_sites_ == ["A"] and auto.target_sites_ == ["B"]
    np.testing.assert_array_equal(auto.classes_, [0, 1])
    proba = auto.predict_proba(data["target"])
    assert proba.shape == (60, 2)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    assert auto.transform(data["target"]).shape == (60, auto.n_features_out_)
    pred = auto.predict(data["target"])
    assert set(pred) <= {0, 1}


def test_a_corroborated_batchnorm_fix_is_chosen(data):
    # the shift is a gain and an offset of the input, which the first BatchNorm layer undoes;
    # both AdaBN variants move the target predictions the same way: corroborated
    from sklearn.metrics import roc_auc_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonizationWarning)
        auto = _auto(keep_candidates=True, candidates=["adabn", "adabn_recompute", "histogram"])
        auto.fit(data["source"], data["y"], X_target=data["target"])
    table = auto.scores_
    assert table.loc["none", "mmd_p"] < 0.05 and table.loc["none", "mmd"] >= auto.min_shift
    assert auto.choice_ == "adabn"
    assert table.loc["adabn", "corroboration"] > 0 and table.loc["adabn", "verdict"] == "chosen"
    assert table.loc["adabn_recompute", "verdict"].startswith("passes")
    assert table.loc["histogram", "verdict"].startswith("rejected: lowers the source AUC")
    auc = {
        name: roc_auc_score(
            data["y_target"], auto.predict_proba(data["target"], candidate=name)[:, 1]
        )
        for name in ("none", "adabn")
    }
    assert auc["adabn"] > auc["none"] + 0.05


def test_an_uncorroborated_candidate_is_rejected(data):
    # ComBat and histogram matching do not move the predictions AdaBN's way here
    with pytest.warns(HarmonizationWarning, match="no harmonizer passed the rule"):
        auto = _auto(candidates=["adabn", "histogram", "combat"]).fit(
            data["source"], data["y"], X_target=data["target"]
        )
    table = auto.scores_
    assert table.loc["adabn", "corroboration"] <= 0
    assert "not corroborated" in table.loc["adabn", "verdict"]
    assert "barely changes the predictions" in table.loc["combat", "verdict"]
    assert auto.choice_ == "none" and "no candidate passed" in auto.reason_


def test_no_shift_means_no_adaptation(data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HarmonizationWarning)
        auto = _auto().fit(data["source"], data["y"], X_target=data["same"])
    # nothing to correct: no warning that the shift is left uncorrected
    assert not any("no harmonizer passed" in str(w.message) for w in caught)
    assert auto.choice_ == "none"
    assert "no source-target shift worth correcting" in auto.reason_
    assert (auto.scores_["verdict"].iloc[1:] == "not considered: no shift to correct").all()


def test_target_labels_are_not_needed_nor_used(data):
    # a label column in the target frame changes nothing: the selector never reads it
    target = data["target"].assign(label=data["y_target"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonizationWarning)
        a = _auto(candidates=["adabn"]).fit(data["source"], data["y"], X_target=data["target"])
        b = _auto(candidates=["adabn"]).fit(data["source"], data["y"], X_target=target)
    assert a.choice_ == b.choice_
    pd.testing.assert_frame_equal(
        a.scores_.drop(columns="seconds"), b.scores_.drop(columns="seconds")
    )


def test_predict_routes_source_rows_through_the_source_side(fitted, data):
    auto = fitted
    src = auto.transform(data["source"], candidate="adabn")
    same_as_target = auto.transform(data["source"].assign(site="B"), candidate="adabn")
    assert not np.allclose(src, same_as_target)
    # rows without site labels are target rows (one target site)
    no_site = data["target"].drop(columns="site")
    np.testing.assert_allclose(auto.predict_proba(no_site), auto.predict_proba(data["target"]))


def test_unseen_site_policy(fitted, data):
    with pytest.raises(ValueError, match="neither source"):
        fitted.predict(data["same"])
    auto = clone(fitted).set_params(unseen="reference", keep_candidates=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonizationWarning)
        auto.fit(data["source"], data["y"], X_target=data["target"])
    assert auto.predict_proba(data["same"]).shape == (60, 2)


def test_cross_validate_in_a_pipeline_keeps_the_site_column(data):
    model = make_pipeline(_auto(candidates=["adabn", "combat"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonizationWarning)
        res = cross_validate(
            model,
            data["source"],
            data["y"],
            cv=StratifiedKFold(2, shuffle=True, random_state=0),
            scoring="roc_auc",
            params={"autoharmonizer__X_target": data["target"]},
        )
    assert np.all(res["test_score"] > 0.6)


def test_clone_and_pickle(fitted, data):
    c = clone(fitted)
    assert c.get_params()["candidates"] == "auto" and not hasattr(c, "choice_")
    back = pickle.loads(pickle.dumps(fitted))
    assert back.choice_ == fitted.choice_
    np.testing.assert_allclose(
        back.predict_proba(data["target"]), fitted.predict_proba(data["target"])
    )


def test_features_without_a_network_skip_the_adabn_candidates(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonizationWarning)
        auto = AutoHarmonizer(StatFeatures(), cv=3, random_state=0).fit(
            data["source"], data["y"], X_target=data["target"]
        )
    status = auto.scores_["status"]
    assert status["adabn"].startswith("skipped")
    assert status["histogram"] == "ok" and status["combat"] == "ok"
    assert auto.choice_ in status[status == "ok"].index


def test_a_harmful_candidate_warns_and_is_not_chosen(data):
    # the same scanner: "keep" normalises the target by its own moments but the source by
    # the network's statistics, which moves the domains apart
    with pytest.warns(HarmonizationWarning, match="adabn_keep"):
        auto = _auto(candidates=["adabn_keep"]).fit(
            data["source"], data["y"], X_target=data["same"]
        )
    assert auto.scores_.loc["adabn_keep", "mmd"] > auto.scores_.loc["none", "mmd"]
    assert auto.choice_ == "none"


def test_input_errors(data):
    auto = _auto()
    with pytest.raises(ValueError, match="X_target"):
        auto.fit(data["source"], data["y"])
    with pytest.raises(ValueError, match="source sites"):
        auto.fit(data["source"], data["y"], X_target=data["source"])
    with pytest.raises(ValueError, match="not a candidate name"):
        _auto(candidates=["adabm"]).fit(data["source"], data["y"], X_target=data["target"])
    with pytest.raises(ValueError, match="at least 2 classes"):
        auto.fit(data["source"], np.zeros(80, int), X_target=data["target"])
    with pytest.raises(ValueError, match="shape"):
        auto.fit(data["source"], data["y"][:5], X_target=data["target"])


# --------------------------------------------------------------------------------------------
# the shift checks of the individual harmonizers
# --------------------------------------------------------------------------------------------
def test_check_shift_change_measures_and_warns():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 4)), rng.normal(size=(60, 4))
    far = b + 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = check_shift_change((a, b), (a, b + 0.01), name="H")
    assert not same.increased
    with pytest.warns(HarmonizationWarning, match="H increased"):
        grew = check_shift_change((a, b), (a, far), name="H", what="site 'B'")
    assert grew.increased and grew.mmd_after > grew.mmd_before
    quiet = check_shift_change((a, b), (a, far), name="H", warn=False)
    assert quiet.increased
    shrank = check_shift_change((a, far), (a, b), name="H", warn=False)
    assert not shrank.increased
    mmd, p, noise = measure_shift(a, far)
    assert mmd > 0 and p < 0.05 and noise > 0


def test_adabn_check_shift(data):
    with pytest.warns(HarmonizationWarning, match="source_stats='keep'"):
        keep = AdaBN(NetFeatures(), source_stats="keep").fit(data["source"], X_target=data["same"])
    assert keep.shift_changes_["C"].increased
    with warnings.catch_warnings():
        warnings.simplefilter("error", HarmonizationWarning)
        match = AdaBN(NetFeatures()).fit(data["source"], X_target=data["target"])
        off = AdaBN(NetFeatures(), source_stats="keep", check_shift=False).fit(
            data["source"], X_target=data["target"]
        )
    change = match.shift_changes_["B"]
    assert not change.increased and change.mmd_after < change.mmd_before
    assert off.shift_changes_ == {}


def test_combat_check_shift():
    rng = np.random.default_rng(0)
    # the same distribution at both sites, but five outliers at site B inflate its variance:
    # ComBat shrinks all of B's rows, which moves them away from A's
    X = pd.DataFrame(rng.normal(size=(400, 3)), columns=["f", "g", "h"])
    X.loc[200:204, "f"] = 25.0
    X["site"] = ["A"] * 200 + ["B"] * 200
    with pytest.warns(HarmonizationWarning, match="ComBatHarmonizer increased"):
        cb = ComBatHarmonizer().fit(X)
    assert cb.shift_changes_["B"].increased
    # a location / scale effect, what ComBat is for: no warning
    Y = pd.DataFrame(rng.normal(size=(400, 3)), columns=["f", "g", "h"])
    Y.iloc[200:] = Y.iloc[200:] * 2.0 + 1.0
    Y["site"] = ["A"] * 200 + ["B"] * 200
    with warnings.catch_warnings():
        warnings.simplefilter("error", HarmonizationWarning)
        ok = ComBatHarmonizer().fit(Y)
        off = ComBatHarmonizer(check_shift=False).fit(X)
    assert ok.shift_changes_ and not any(c.increased for c in ok.shift_changes_.values())
    assert off.shift_changes_ == {}


def _half_tissue(n, tissue_rows, rng):
    """Images with a flat, slightly noisy background below ``tissue_rows`` rows of tissue."""
    from scipy import ndimage

    tissue = ndimage.gaussian_filter(rng.normal(size=(n, 16, 16)), sigma=(0, 2, 2))
    out = 20 + 2 * rng.normal(size=(n, 16, 16))
    tissue = 120 + 30 * tissue / tissue.std() + 5 * rng.normal(size=tissue.shape)
    out[:, :tissue_rows] = tissue[:, :tissue_rows]
    return out.astype(np.float32)


def test_histogram_matcher_check_shift():
    rng = np.random.default_rng(0)
    ref = _half_tissue(60, 8, rng)
    hm = HistogramMatcher().fit(ref)
    with warnings.catch_warnings():  # the same scanner and field of view: no warning
        warnings.simplefilter("error", HarmonizationWarning)
        hm.transform(_half_tissue(60, 8, rng))
        HistogramMatcher(check_shift=False).fit(ref).transform(_half_tissue(60, 4, rng))
    # more background: matching maps the background onto tissue intensities and amplifies
    # its noise, the texture moves away from the reference's
    wide = make_image_frame(_half_tissue(60, 4, rng), sites=["B"] * 60)
    with pytest.warns(HarmonizationWarning, match="HistogramMatcher increased .* site 'B'"):
        hm.transform(wide)


def test_domain_adapter_check_shift():
    pytest.importorskip("skada")
    from skrtl import DomainAdapter

    rng = np.random.default_rng(0)
    # the same distribution at both sites, but outliers at the target inflate its covariance:
    # CORAL recolours the source rows with it, which moves them away from the target's
    X = pd.DataFrame(rng.normal(size=(400, 3)), columns=["f", "g", "h"])
    X.loc[200:209, ["f", "g"]] = 30.0
    X["site"] = ["A"] * 200 + ["B"] * 200
    with pytest.warns(HarmonizationWarning, match="DomainAdapter\\('coral'\\) increased"):
        da = DomainAdapter("coral", target_sites="B").fit(X)
    assert da.shift_changes_["A"].increased
    # a covariance shift, what CORAL is for: no warning
    Y = pd.DataFrame(rng.normal(size=(400, 3)), columns=["f", "g", "h"])
    Y.iloc[200:] = Y.iloc[200:].to_numpy() @ np.array([[3.0, 1.0, 0], [0, 0.5, 0], [0, 0, 2.0]])
    Y["site"] = ["A"] * 200 + ["B"] * 200
    with warnings.catch_warnings():
        warnings.simplefilter("error", HarmonizationWarning)
        ok = DomainAdapter("coral", target_sites="B").fit(Y)
        off = DomainAdapter("coral", target_sites="B", check_shift=False).fit(X)
    assert ok.shift_changes_ and not ok.shift_changes_["A"].increased
    assert ok.shift_changes_["A"].mmd_after < ok.shift_changes_["A"].mmd_before
    assert off.shift_changes_ == {}


def test_corroboration_is_by_the_witnesses(data):
    # AdaBN is corroborated by ComBat, ComBat by AdaBN, any other candidate by both
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonizationWarning)
        auto = _auto(candidates=["adabn", "combat", "histogram"]).fit(
            data["source"], data["y"], X_target=data["target"]
        )
    table = auto.scores_
    assert table.loc["adabn", "corroborated_by"] == "combat"
    assert table.loc["combat", "corroborated_by"] == "adabn"
    assert table.loc["histogram", "corroborated_by"] == "adabn, combat"
    # ComBat passes only when corroborated, like every other candidate
    if table.loc["combat", "corroboration"] <= auto.min_corroboration:
        assert table.loc["combat", "verdict"].startswith("rejected")
    with pytest.raises(ValueError, match="witnesses"):
        _auto(witnesses=["adabm"]).fit(data["source"], data["y"], X_target=data["target"])


def test_compared_candidates_are_scored_but_never_chosen(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonizationWarning)
        auto = _auto(candidates=["histogram"], compare=["adabn"], keep_candidates=True)
        auto.fit(data["source"], data["y"], X_target=data["target"])
    table = auto.scores_
    assert list(table.index) == ["none", "histogram", "adabn"]
    assert table.loc["adabn", "status"] == "ok"
    assert table.loc["adabn", "verdict"].startswith("compared only")
    assert auto.choice_ != "adabn" and not table.loc["adabn", "chosen"]
    assert auto.predict_proba(data["target"], candidate="adabn").shape == (60, 2)


def test_consensus_is_the_mean_log_probability_of_adabn_and_combat(fitted, data):
    auto, T = fitted, data["target"]
    p = {c: auto.predict_proba(T, candidate=c) for c in ("adabn", "combat", "consensus")}
    geo = np.sqrt(p["adabn"] * p["combat"])
    np.testing.assert_allclose(p["consensus"], geo / geo.sum(1, keepdims=True), rtol=1e-6)
    d = {c: auto.decision_function(T, candidate=c) for c in ("adabn", "combat", "consensus")}
    np.testing.assert_allclose(d["consensus"], (d["adabn"] + d["combat"]) / 2, rtol=1e-5)
    np.testing.assert_array_equal(
        auto.predict(T, candidate="consensus"), (d["consensus"] > 0).astype(int)
    )
    # its features are the members' side by side
    F = auto.transform(T, candidate="consensus")
    np.testing.assert_allclose(
        F, np.hstack([auto.transform(T, candidate=c) for c in ("adabn", "combat")])
    )
    assert auto.scores_.loc["consensus", "corroborated_by"] == "adabn, combat"


def _rule_table(**changes):
    """A criteria table in which AdaBN passes the rule and the others do not."""
    base = {"status": "ok", "source_auc": 0.8, "mmd": 0.05, "mmd_p": 0.3}
    rows = {
        "none": {**base, "mmd": 0.5, "mmd_p": 0.001, "agreement": 1.0},
        "consensus": {**base, "agreement": 0.8, "corroboration": 0.2},
        "adabn": {**base, "agreement": 0.7, "corroboration": 0.1},
        "combat": {**base, "agreement": 0.99, "corroboration": 0.1},
    }
    for key, value in changes.items():
        name, col = key.split("__")
        rows[name][col] = value
    table = pd.DataFrame(rows).T
    table["corroborated_by"] = ["", "adabn, combat", "combat", "adabn"]
    return table.infer_objects()


def test_consensus_passes_when_a_member_passes_on_its_own():
    auto = AutoHarmonizer(candidates=["consensus", "adabn", "combat"])
    choice, reason, table = auto._select(_rule_table())
    assert choice == "consensus" and table.loc["consensus", "verdict"] == "chosen"
    assert "adabn (corroboration +0.10" in reason and "passes the rule on its own" in reason
    assert table.loc["adabn", "verdict"].startswith("passes, after 'consensus'")
    assert "barely changes" in table.loc["combat", "verdict"]
    # no member passes: rejected, with the members' reasons
    choice, reason, table = auto._select(_rule_table(adabn__corroboration=-0.1))
    assert choice == "none"
    verdict = table.loc["consensus", "verdict"]
    assert verdict.startswith("rejected: no member passes the rule on its own (adabn: not corr")
    # it must keep the source AUC itself
    choice, _, table = auto._select(_rule_table(consensus__source_auc=0.7))
    assert choice == "adabn"
    assert table.loc["consensus", "verdict"] == "rejected: lowers the source AUC by 0.100"
    # the members are fitted even when only the consensus is a candidate
    assert AutoHarmonizer(candidates=["consensus"])._candidate_names() == [
        "none",
        "adabn",
        "combat",
        "consensus",
    ]


def test_consensus_is_skipped_without_two_witnesses(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonizationWarning)
        auto = AutoHarmonizer(StatFeatures(), cv=3, random_state=0).fit(
            data["source"], data["y"], X_target=data["target"]
        )
    status = auto.scores_.loc["consensus", "status"]
    assert status.startswith("skipped: needs two fitted witnesses") and "['combat']" in status
    assert auto.choice_ != "consensus"
