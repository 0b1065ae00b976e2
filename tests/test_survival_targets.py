"""Survival targets: fields read by name, clear errors, lifelines <-> sksurv <-> skrtl."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skrtl import (
    CoxPHSurvival,
    SelectKBestSurvival,
    as_survival_target,
    concordance_index,
    make_survival_target,
    survival_target_to_frame,
)

lifelines = pytest.importorskip("lifelines")
from lifelines import CoxPHFitter  # noqa: E402
from lifelines.datasets import load_rossi  # noqa: E402

EVENT = np.array([True, False, True, True, False])
TIME = np.array([5.0, 8.0, 2.5, 4.0, 9.0])


def _check(y):
    assert y.dtype.names == ("event", "time")
    np.testing.assert_array_equal(y["event"], EVENT)
    np.testing.assert_array_equal(y["time"], TIME)


# ------------------------------------------------------------------------------- by name
@pytest.mark.parametrize(
    "event_name,time_name",
    [
        ("event", "time"),
        ("status", "time"),
        ("deadstatus.event", "Survival.time"),  # Lung1 / TCIA clinical table
        ("E", "T"),  # lifelines' examples
        ("observed", "duration"),
        ("death", "days"),
        ("dead", "OS_months"),
        ("fstat", "lenfol"),  # scikit-survival's whas500
        ("vital_status", "days_to_death"),  # TCGA: a time word wins over "death"
        ("Status", "Survival_in_days"),  # scikit-survival's veterans
    ],
)
@pytest.mark.parametrize("time_first", [False, True])
def test_fields_are_read_by_name_in_any_order(event_name, time_name, time_first):
    cols = {event_name: EVENT.astype(int), time_name: TIME}
    if time_first:
        cols = dict(reversed(list(cols.items())))
    _check(as_survival_target(pd.DataFrame(cols)))
    dtype = [(k, int if k == event_name else float) for k in cols]
    rec = np.array(list(zip(*cols.values())), dtype=dtype)
    _check(as_survival_target(rec))


def test_time_event_order_structured_array_works_in_estimators():
    # the reproducer of issue 15: fields in (time, event) order
    df = load_rossi()
    y_sk = make_survival_target(df["arrest"], df["week"])
    X = df.drop(columns=["arrest", "week"])
    y_te = np.empty(len(df), dtype=[("time", float), ("event", bool)])
    y_te["time"], y_te["event"] = df["week"], df["arrest"].astype(bool)
    y_frame = df[["week", "arrest"]]  # DataFrame [time, event], lifelines' names
    ref = CoxPHSurvival(penalizer=0.1).fit(X, y_sk)
    for y in (y_te, y_frame, pd.DataFrame({"time": df["week"], "event": df["arrest"]})):
        model = CoxPHSurvival(penalizer=0.1).fit(X, y)
        np.testing.assert_allclose(model.coef_, ref.coef_)
        assert model.score(X, y) == ref.score(X, y_sk)
        assert concordance_index(y, ref.predict(X)) == ref.score(X, y_sk)
    sel = SelectKBestSurvival(k=2).fit(X, y_te)
    np.testing.assert_array_equal(sel.scores_, SelectKBestSurvival(k=2).fit(X, y_sk).scores_)


def test_uninformative_names_use_dtype_values_then_position():
    # bool dtype marks the event, wherever it is
    y = np.array(list(zip(TIME, EVENT)), dtype=[("a", float), ("b", bool)])
    _check(as_survival_target(y))
    # only one field holds 0/1: it is the event
    _check(as_survival_target(pd.DataFrame({"x": TIME, "z": EVENT.astype(int)})))
    # both 0/1: position (event first, the Surv.from_arrays layout)
    y = as_survival_target(pd.DataFrame({"p": [1, 0, 1], "q": [1, 1, 0]}))
    np.testing.assert_array_equal(y["event"], [True, False, True])
    # one name known, the other not
    _check(as_survival_target(pd.DataFrame({"week": TIME, "arrest": EVENT})))


def test_explicit_names_and_extra_columns():
    df = pd.DataFrame(
        {"id": range(5), "os_time": TIME, "os_event": EVENT, "pfs_time": TIME / 2, "age": 60.0}
    )
    with pytest.raises(ValueError, match="Several fields of y look like times"):
        as_survival_target(df)
    _check(as_survival_target(df, event="os_event", time="os_time"))
    _check(as_survival_target(df[["id", "os_time", "os_event", "age"]]))
    with pytest.raises(ValueError, match="is not a field"):
        as_survival_target(df, event="dead")
    with pytest.raises(ValueError, match="Cannot tell"):
        as_survival_target(df[["id", "age", "os_time"]])


def test_dict_of_arrays_and_nullable_dtypes():
    _check(as_survival_target({"time": TIME, "event": EVENT}))
    df = pd.DataFrame(
        {"time": pd.array([5, 8, 2.5, 4, 9], dtype="Float64"), "event": pd.array(EVENT)}
    )
    _check(as_survival_target(df))


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "frame,match",
    [
        ({"time": [1.0, None, 3.0], "event": [1, 0, 1]}, r"y\['time'\] \(time\) has a missing"),
        ({"time": [1.0, np.nan, 3.0], "event": [1, 0, 1]}, r"first at row 1"),
        ({"time": [1.0, 2.0, 3.0], "status": [1, None, 1]}, r"y\['status'\] \(event\) has a"),
        ({"time": [1.0, -2.0, 3.0], "event": [1, 0, 1]}, r"y\['time'\].*non-negative.*-2.0"),
        ({"time": [1.0, np.inf, 3.0], "event": [1, 0, 1]}, r"y\['time'\].*infinite"),
        ({"time": [1.0, 2.0, 3.0], "status": [1, 2, 2]}, r"y\['status'\].*status == 2"),
        ({"time": [1.0, 2.0, 3.0], "status": ["dead", "alive", "dead"]}, r"'dead'"),
        ({"time": ["a", "b", "c"], "event": [1, 0, 1]}, r"y\['time'\].*numeric"),
        ({"time": [1.0, 2.0, 3.0], "censored": [1, 0, 1]}, r"1 = censored, the opposite"),
        ({"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0, 6.0]}, r"Neither field"),
    ],
)
def test_bad_targets_give_errors_naming_the_field(frame, match):
    with pytest.raises(ValueError, match=match):
        as_survival_target(pd.DataFrame(frame))


def test_errors_surface_through_estimators():
    X = np.random.default_rng(0).normal(size=(3, 2))
    y = pd.DataFrame({"time": [1.0, None, 3.0], "event": [1, 0, 1]})
    with pytest.raises(ValueError, match=r"CoxPHSurvival: y\['time'\] \(time\) has a missing"):
        CoxPHSurvival().fit(X, y)
    with pytest.raises(ValueError, match="requires y to be passed"):
        CoxPHSurvival().fit(X, None)
    with pytest.raises(ValueError, match="plain 1-D array of times"):
        CoxPHSurvival().fit(X, np.array([1.0, 2.0, 3.0]))


def test_make_survival_target_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^time has a missing value"):
        make_survival_target([1, 0], [1.0, None])
    with pytest.raises(ValueError, match=r"^event has a missing value"):
        make_survival_target([1, None], [1.0, 2.0])
    with pytest.raises(ValueError, match="Are the event and time fields swapped"):
        make_survival_target([1.0, 2.0], [True, False])


def test_cens_named_event_is_accepted_in_sksurv_layout_and_when_named():
    # scikit-survival's gbsg2 / aids targets name the (boolean, first) event field "cens"
    y = np.array(list(zip(EVENT, TIME)), dtype=[("cens", bool), ("time", float)])
    _check(as_survival_target(y))
    df = pd.DataFrame({"time": TIME, "censored": EVENT.astype(int)})
    _check(as_survival_target(df, event="censored"))


# ------------------------------------------------------------------------------- round trip
def test_round_trip_lifelines_sksurv_skrtl():
    sksurv_util = pytest.importorskip("sksurv.util")
    df = load_rossi()
    # lifelines -> skrtl
    y = make_survival_target(df["arrest"], df["week"])
    np.testing.assert_array_equal(as_survival_target(df[["week", "arrest"]]), y)
    # skrtl == scikit-survival: same dtype, same field names
    y_sk = sksurv_util.Surv.from_arrays(event=df["arrest"].astype(bool), time=df["week"])
    assert y_sk.dtype == y.dtype
    np.testing.assert_array_equal(y_sk, y)
    y_df = sksurv_util.Surv.from_dataframe("arrest", "week", df)
    np.testing.assert_array_equal(as_survival_target(y_df), y)
    # skrtl -> lifelines
    frame = survival_target_to_frame(y, duration_col="week", event_col="arrest")
    pd.testing.assert_frame_equal(frame, df[["week", "arrest"]].astype({"week": float}))
    X = df.drop(columns=["arrest", "week"])
    cph = CoxPHFitter(penalizer=0.1).fit(pd.concat([X, frame], axis=1), "week", "arrest")
    ours = CoxPHSurvival(penalizer=0.1).fit(X, y_sk)  # an sksurv target in skrtl
    np.testing.assert_allclose(ours.coef_, cph.params_.to_numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="must differ"):
        survival_target_to_frame(y, duration_col="x", event_col="x")


def test_sksurv_bundled_targets_are_read():
    datasets = pytest.importorskip("sksurv.datasets")
    for loader in (datasets.load_whas500, datasets.load_veterans_lung_cancer, datasets.load_gbsg2):
        _, y = loader()
        out = as_survival_target(y)
        event_field, time_field = y.dtype.names
        np.testing.assert_array_equal(out["event"], y[event_field])
        np.testing.assert_array_equal(out["time"], y[time_field])
