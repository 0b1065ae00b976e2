"""Tests of FineTuneSurvival: the Cox loss (against lifelines and scikit-survival), the
event-stratified batches, the Breslow baseline, and the estimator in searches and AdaBN.

Networks run on the embedded tf_efficientnet_lite0 at 32 px with a few images and 1-3 epochs.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold

from skrtl import (
    AdaBN,
    CoxPartialLikelihoodLoss,
    FineTuneSurvival,
    TransferSearchCV,
    breslow_cumulative_hazard,
    concordance_index,
    cox_partial_likelihood_loss,
    make_image_frame,
    make_survival_target,
    make_time_dependent_auc_scorer,
)
from skrtl._survival_finetune import EventStratifiedLoader, EventStratifiedSampler

SIZE = 32


def _tied_data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    time = rng.integers(1, 8, n).astype(float)  # few distinct times: many ties
    event = rng.random(n) < 0.7
    x = rng.normal(size=n)
    return x, time, event


def _loss(risk, time, event, ties):
    return cox_partial_likelihood_loss(
        torch.as_tensor(risk, dtype=torch.float64),
        torch.as_tensor(time),
        torch.as_tensor(event),
        ties=ties,
    )


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_loss_and_gradient_equal_scikit_survival_on_fixed_risks(ties):
    from sksurv.linear_model.coxph import CoxPHOptimizer

    x, time, event = _tied_data()
    n, n_events = x.size, int(event.sum())
    w = 0.7
    opt = CoxPHOptimizer(x[:, None], event, time, np.zeros(1), ties)
    # scikit-survival averages over samples, the loss here over events
    expected = opt.nlog_likelihood(np.array([w])) * n / n_events
    beta = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    loss = cox_partial_likelihood_loss(
        beta * torch.as_tensor(x), torch.as_tensor(time), torch.as_tensor(event), ties=ties
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    opt.update(np.array([w]))
    assert beta.grad.item() == pytest.approx(float(opt.gradient[0]) * n / n_events, rel=1e-10)


def test_efron_and_breslow_differ_with_ties_and_agree_without():
    x, time, event = _tied_data()
    assert _loss(x, time, event, "efron").item() < _loss(x, time, event, "breslow").item()
    distinct = time + np.arange(time.size) * 1e-3
    assert _loss(x, distinct, event, "efron").item() == pytest.approx(
        _loss(x, distinct, event, "breslow").item(), rel=1e-12
    )


def test_efron_loss_is_lifelines_log_likelihood_at_its_optimum():
    from lifelines import CoxPHFitter

    x, time, event = _tied_data(seed=1)
    df = pd.DataFrame({"x": x, "T": time, "E": event.astype(int)})
    cph = CoxPHFitter().fit(df, "T", "E")  # Efron ties
    beta = torch.tensor(float(cph.params_["x"]), dtype=torch.float64, requires_grad=True)
    loss = cox_partial_likelihood_loss(
        beta * torch.as_tensor(x), torch.as_tensor(time), torch.as_tensor(event)
    )
    assert -loss.item() * event.sum() == pytest.approx(cph.log_likelihood_, rel=1e-9)
    loss.backward()
    assert abs(beta.grad.item()) < 1e-4  # the optimum of the same likelihood (lifelines tol)


def test_loss_is_shift_invariant_stable_and_zero_without_events():
    x, time, event = _tied_data()
    base = _loss(x, time, event, "efron").item()
    assert _loss(x + 500.0, time, event, "efron").item() == pytest.approx(base, rel=1e-9)
    big = _loss(200.0 * x, time, event, "efron")
    assert torch.isfinite(big)
    risk = torch.zeros(5, requires_grad=True)
    none = cox_partial_likelihood_loss(risk, torch.arange(5.0), torch.zeros(5, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and risk.grad is not None
    module = CoxPartialLikelihoodLoss("breslow")
    target = torch.as_tensor(np.column_stack([time, event]), dtype=torch.float64)
    out = module(torch.as_tensor(x)[:, None], target)
    assert out.item() == pytest.approx(_loss(x, time, event, "breslow").item())
    with pytest.raises(ValueError, match="ties must be one of"):
        CoxPartialLikelihoodLoss("exact")


def test_higher_risk_for_earlier_events_lowers_the_loss():
    time = np.arange(1.0, 11.0)
    event = np.ones(10, dtype=bool)
    good = _loss(-time, time, event, "efron").item()  # early death = high risk
    bad = _loss(time, time, event, "efron").item()
    assert good < _loss(np.zeros(10), time, event, "efron").item() < bad


# --------------------------------------------------------------------------------------------
# batches and baseline
# --------------------------------------------------------------------------------------------
def test_sampler_spreads_events_evenly_over_batches():
    event = np.zeros(100, dtype=bool)
    event[:23] = True
    torch.manual_seed(0)
    order = np.array(list(EventStratifiedSampler(event)))
    assert sorted(order.tolist()) == list(range(100))
    per_batch = [event[order[i : i + 20]].sum() for i in range(0, 100, 20)]
    assert min(per_batch) >= 4 and max(per_batch) <= 5  # 20 * 0.23 = 4.6
    torch.manual_seed(0)
    assert np.array_equal(order, list(EventStratifiedSampler(event)))
    torch.manual_seed(1)
    assert not np.array_equal(order, list(EventStratifiedSampler(event)))


def test_loader_reads_events_from_a_skorch_dataset():
    from skorch.dataset import Dataset

    event = np.arange(30) % 3 == 0
    y = torch.as_tensor(np.column_stack([np.arange(30.0), event]), dtype=torch.float64)
    loader = EventStratifiedLoader(Dataset(torch.zeros(30, 1), y), batch_size=10, shuffle=True)
    counts = [int(yb[:, 1].sum()) for _, yb in loader]
    assert sorted(counts) == [3, 3, 4]  # 10 events spread over three batches of 10


def test_breslow_baseline_equals_lifelines():
    from lifelines import CoxPHFitter

    x, time, event = _tied_data(seed=2)
    df = pd.DataFrame({"x": x, "T": time, "E": event.astype(int)})
    cph = CoxPHFitter().fit(df, "T", "E")
    risk = np.log(cph.predict_partial_hazard(df[["x"]]).to_numpy())
    times, h0 = breslow_cumulative_hazard(make_survival_target(event, time), risk)
    ref = cph.baseline_cumulative_hazard_
    np.testing.assert_allclose(times, ref.index.to_numpy())
    np.testing.assert_allclose(h0, ref.iloc[:, 0].to_numpy(), rtol=1e-10)


# --------------------------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------------------------
def _images(n=24, seed=0):
    """Images whose brightness sets the hazard: bright squares die early."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(0.0, 2.0, n)
    X = rng.normal(0.0, 0.2, (n, SIZE, SIZE)).astype(np.float32)
    X[:, 8:24, 8:24] += level[:, None, None].astype(np.float32)
    time = rng.exponential(10.0 * np.exp(-3.0 * level))
    event = rng.random(n) < 0.8
    return X, make_survival_target(event, time)


def _model(**kw):
    params = dict(input_size=SIZE, max_epochs=1, batch_size=8, n_estimators=1, random_state=0)
    params.update(kw)
    return FineTuneSurvival(**params)


def test_fit_predict_survival_function_and_scorers():
    X, y = _images()
    model = _model(pretrained=False).fit(X, y)
    risk = model.predict(X)
    assert risk.shape == (len(X),) and np.isfinite(risk).all()
    assert abs(risk.mean()) < 1e-6  # centred on the training risks
    assert model.score(X, y) == pytest.approx(concordance_index(y, risk))
    assert np.array_equal(model.survival_train_, y)
    times = np.array([1.0, 3.0, 10.0])
    surv = model.predict_survival_function(X, times=times)
    assert surv.shape == (len(X), 3)
    assert ((surv >= 0) & (surv <= 1)).all() and (np.diff(surv, axis=1) <= 1e-12).all()
    # higher risk, lower survival at every time
    order = np.argsort(risk)
    assert (np.diff(surv[order], axis=0) <= 1e-12).all()
    assert model.predict_survival_function(X).shape == (len(X), model.event_times_.size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the training censoring is found: no fallback warning
        auc = make_time_dependent_auc_scorer([3.0, 6.0], censoring="train")(model, X, y)
    assert 0.0 <= auc <= 1.0
    again = pickle.loads(pickle.dumps(model))
    np.testing.assert_allclose(again.predict(X), risk, rtol=1e-6, atol=1e-6)


def test_learns_the_risk_of_held_out_images():
    X, y = _images(n=96, seed=1)
    train, test = np.arange(64), np.arange(64, 96)
    model = _model(
        strategy="linear_probe", lr=0.01, max_epochs=8, batch_size=32, validation_fraction=None
    )
    model.fit(X[train], y[train])
    assert model.score(X[test], y[test]) > 0.7
    assert model.history_[-1]["train_loss"] < model.history_[0]["train_loss"]


def test_validation_c_index_drives_early_stopping_and_the_ensemble():
    X, y = _images(n=40, seed=2)
    model = _model(
        strategy="linear_probe",
        lr=0.05,
        max_epochs=4,
        patience=2,
        n_estimators=2,
        validation_fraction=0.25,
    ).fit(X, y)
    assert len(model.nets_) == 2
    for history, best in zip(model.histories_, model.best_epochs_):
        scores = [row["valid_cindex"] for row in history]
        assert all(0.0 <= s <= 1.0 for s in scores) and "valid_loss" in history[0]
        assert best == 1 + int(np.argmax(scores))  # restored epoch: the best C-index


def test_early_stopping_on_the_validation_loss_when_asked():
    X, y = _images(n=40, seed=2)
    model = _model(
        strategy="linear_probe",
        lr=0.05,
        max_epochs=4,
        patience=4,
        validation_fraction=0.25,
        early_stopping="loss",
    ).fit(X, y)
    losses = [row["valid_loss"] for row in model.history_]
    assert model.best_epoch_ == 1 + int(np.argmin(losses))
    assert dict(model.net_.callbacks_)["early_stopping"].monitor == "valid_loss"


def test_warmup_cosine_schedule_runs_on_event_stratified_batches():
    X, y = _images(n=24, seed=2)
    model = _model(lr_schedule="warmup_cosine", max_epochs=2, early_stopping=False).fit(X, y)
    groups = model.net_.optimizer_.param_groups
    assert all(0.0 <= g["lr"] < g["initial_lr"] for g in groups)  # warmed up, then annealed
    assert np.isfinite(model.predict(X)).all()


def test_tta_averages_the_mirror_image():
    X, y = _images(n=16)
    model = _model(pretrained=False, tta=True).fit(X, y)
    both = model.predict(X)
    model.tta = False
    plain, mirror = model.predict(X), model.predict(X[:, :, ::-1].copy())
    np.testing.assert_allclose(both, (plain + mirror) / 2, rtol=1e-5, atol=1e-6)


def test_freeze_depth_and_layerwise_rates():
    X, y = _images(n=16)
    model = _model(freeze_depth=6, gamma=0.5, lr=1e-2).fit(X, y)
    assert model.freeze_depth_ == 6 and model.cached_prefix_ > 0
    L = model.n_layers_
    assert model.layer_lrs_ == {l: pytest.approx(1e-2 * 0.5 ** (L - l)) for l in range(7, L + 1)}
    groups = model.net_.optimizer_.param_groups
    assert sorted(g["layer"] for g in groups) == list(range(7, L + 1))


def test_targets_are_read_like_cox_and_bad_ones_fail_clearly():
    X, y = _images(n=16)
    frame = pd.DataFrame({"Survival.time": y["time"], "deadstatus.event": y["event"]})
    model = _model(pretrained=False).fit(X, frame)
    np.testing.assert_array_equal(model.survival_train_, y)
    with pytest.raises(ValueError, match="FineTuneSurvival"):
        _model(pretrained=False).fit(X, np.arange(16) % 2)
    with pytest.raises(ValueError, match="no event"):
        _model(pretrained=False).fit(X, make_survival_target(np.zeros(16, bool), y["time"]))
    with pytest.raises(ValueError, match="y has 15"):
        _model(pretrained=False).fit(X, y[:15])
    with pytest.warns(UserWarning, match="events per training batch"):
        few = make_survival_target(np.arange(16) == 0, y["time"])
        _model(pretrained=False, validation_fraction=None).fit(X, few)


def test_grid_search_and_transfer_search_with_pruning_on_the_c_index():
    import optuna

    X, y = _images(n=24)
    frame = make_image_frame(X)
    grid = GridSearchCV(
        _model(pretrained=False, validation_fraction=None),
        {"lr": [1e-3, 1e-2]},
        cv=KFold(2, shuffle=True, random_state=0),
    ).fit(frame, y)
    scores = grid.cv_results_["mean_test_score"]
    assert np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
    assert hasattr(grid.best_estimator_, "survival_train_")
    search = TransferSearchCV(
        _model(strategy="linear_probe", max_epochs=2, validation_fraction=0.25),
        param_distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)},
        n_trials=2,
        cv=KFold(2, shuffle=True, random_state=0),
        random_state=0,
    ).fit(frame, y)
    first = search.study_.trials[0]
    assert first.intermediate_values  # pruning reports came from the epochs
    assert all(0.0 <= v <= 1.0 for v in first.intermediate_values.values())  # C, not a loss
    assert hasattr(search.best_estimator_, "survival_train_")


def test_adabn_adapts_the_survival_network():
    X, y = _images(n=24)
    sites = np.array(["A"] * 16 + ["B"] * 8)
    frame = make_image_frame(X + (sites == "B")[:, None, None] * 0.5, sites=list(sites))
    src = sites == "A"
    adabn = AdaBN(_model(pretrained=False), source_stats="keep")
    adabn.fit(frame[src], y[src], X_target=frame[~src])
    risk = adabn.predict(frame)
    assert risk.shape == (24,) and np.isfinite(risk).all()
    plain = adabn.estimator_.predict(frame[~src])
    assert not np.allclose(risk[~src], plain)  # site B went through its own statistics
    np.testing.assert_allclose(risk[src], adabn.estimator_.predict(frame[src]), rtol=1e-6)
    assert adabn.score(frame, y) == pytest.approx(concordance_index(y, risk))


def test_clone_keeps_parameters_and_invalid_ties_are_refused():
    from sklearn.utils._param_validation import InvalidParameterError

    model = _model(ties="breslow")
    assert clone(model).get_params()["ties"] == "breslow"
    X, y = _images(n=8)
    with pytest.raises(InvalidParameterError, match="ties"):
        _model(ties="exact").fit(X, y)


def test_slice_wise_volumes_average_the_risk_of_their_slices():
    from conftest import blob_volumes

    vols, labels, masks = blob_volumes(n=8)
    y = make_survival_target(np.arange(8) % 4 != 0, 5.0 + 3.0 * (1 - labels) + np.arange(8))
    frame = make_image_frame(list(vols), masks=list(masks))
    model = _model(pretrained=False, mode="3d", validation_fraction=None).fit(frame, y)
    risk = model.predict(frame)
    assert risk.shape == (8,) and np.isfinite(risk).all()
    assert model.net_.history[-1]["train_loss"] > 0  # trained on the masked slices
    one = model.predict(frame.iloc[[3]])
    np.testing.assert_allclose(one, risk[[3]], rtol=1e-5, atol=1e-6)
