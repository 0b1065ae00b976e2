"""sklearn's own estimator checks over every skrtl estimator.

Each estimator is listed in ``ESTIMATORS`` with small, fast settings. Checks that cannot pass for
a reason inherent to the estimator (for example image estimators, which cannot take sklearn's
tabular 2-D test data) are listed in ``EXPECTED_FAILED_CHECKS`` with that reason, following
imbalanced-learn's ``test_common.py``.
"""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from conftest import blob_images
from optuna.distributions import FloatDistribution
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks

from skrtl._adabn import AdaBN
from skrtl._auto_harmonize import AutoHarmonizer
from skrtl._calibration import (
    BiasCorrectedTemperatureScaling,
    TemperatureScaling,
    VectorScaling,
)
from skrtl._combat import ComBatHarmonizer
from skrtl._cropper import LesionCropper
from skrtl._domain_adaptation import DomainAdapter, make_site_da_pipeline
from skrtl._features import PretrainedCNNFeatures
from skrtl._finetune import FineTuneClassifier
from skrtl._harmonize import (
    HistogramMatcher,
    IntensityStandardizer,
    IntensityWindow,
    SpacingResampler,
)
from skrtl._label_shift import LabelShiftAdapter
from skrtl._radiomics import RadiomicsFeatures
from skrtl._redundancy import CorrelationClusterSelector
from skrtl._search import TransferSearchCV
from skrtl._survival import CoxPHSurvival, SelectKBestSurvival, make_survival_target
from skrtl._survival_finetune import FineTuneSurvival
from skrtl._survival_fusion import SurvivalEnsemble

_CAL = (
    "X must hold one logit/probability column per class; sklearn's checks pass feature matrices "
    "with another number of columns, which the calibrator rejects on purpose"
)
_CAL_CHECKS = [
    "check_classifiers_classes",
    "check_classifiers_train",
    "check_dtype_object",
    "check_estimators_dtypes",
    "check_estimators_fit_returns_self",
    "check_estimators_nan_inf",
    "check_estimators_overwrite_params",
    "check_estimators_pickle",
    "check_n_features_in_after_fitting",
    "check_non_transformer_estimators_n_iter",
    "check_pipeline_consistency",
    "check_positive_only_tag_during_fit",
    "check_readonly_memmap_input",
    "check_sample_weight_equivalence_on_dense_data",
]
_SURV = (
    "needs a structured (event, time) survival target; sklearn's checks pass class labels or "
    "regression values as y, which are rejected on purpose (tests/test_survival.py runs the "
    "generic checks through a y-adapter)"
)
_SURV_CHECKS = [
    "check_dict_unchanged",
    "check_dont_overwrite_parameters",
    "check_dtype_object",
    "check_estimators_dtypes",
    "check_estimators_fit_returns_self",
    "check_estimators_nan_inf",
    "check_estimators_overwrite_params",
    "check_estimators_pickle",
    "check_f_contiguous_array_estimator",
    "check_fit2d_1feature",
    "check_fit2d_predict1d",
    "check_fit_check_is_fitted",
    "check_fit_idempotent",
    "check_fit_score_takes_y",
    "check_methods_sample_order_invariance",
    "check_methods_subset_invariance",
    "check_n_features_in",
    "check_n_features_in_after_fitting",
    "check_pipeline_consistency",
    "check_positive_only_tag_during_fit",
    "check_readonly_memmap_input",
]
_COX_CHECKS = _SURV_CHECKS + [
    "check_all_zero_sample_weights_error",
    "check_sample_weight_equivalence_on_dense_data",
    "check_sample_weights_list",
    "check_sample_weights_not_an_array",
    "check_sample_weights_not_overwritten",
    "check_sample_weights_pandas_series",
    "check_sample_weights_shape",
]
# a meta-estimator reads y before its members validate X
_ENSEMBLE_CHECKS = _SURV_CHECKS + [
    "check_complex_data",
    "check_estimator_sparse_array",
    "check_estimator_sparse_matrix",
    "check_estimator_sparse_tag",
    "check_estimators_empty_data_messages",
    "check_fit2d_1sample",
]
_SEL_CHECKS = _SURV_CHECKS + [
    "check_transformer_data_not_an_array",
    "check_transformer_general",
    "check_transformer_preserve_dtypes",
]

_COMBAT = (
    "needs the site of every row (a 'site' column of a DataFrame X or a routed sample_domain); "
    "sklearn's generic check data carries none (tests/test_combat.py checks the invariants)"
)
# the same checks as a selector's: every one needs the side data sklearn's test data lacks
_COMBAT_CHECKS = _SEL_CHECKS + ["check_fit2d_1sample"]

_DA = (
    "needs the site of every row (a 'site' column of a DataFrame X or a routed sample_domain) "
    "and at least one target site; sklearn's generic check data carries none "
    "(tests/test_domain_adaptation.py checks the invariants)"
)
_DA_ADAPTER_CHECKS = _COMBAT_CHECKS
_DA_PIPELINE_CHECKS = [c for c in _COMBAT_CHECKS if not c.startswith("check_transformer")] + [
    "check_all_zero_sample_weights_error",
    "check_classifier_data_not_an_array",
    "check_classifiers_classes",
    "check_classifiers_one_label",
    "check_classifiers_one_label_sample_weights",
    "check_classifiers_regression_target",
    "check_classifiers_train",
    "check_decision_proba_consistency",
    "check_sample_weight_equivalence_on_dense_data",
    "check_sample_weights_list",
    "check_sample_weights_not_an_array",
    "check_sample_weights_not_overwritten",
    "check_sample_weights_pandas_series",
    "check_sample_weights_shape",
    "check_supervised_y_2d",
]


def _finetune():
    """A one-epoch, randomly initialised fine-tuning classifier (fast)."""
    return FineTuneClassifier(
        input_size=32,
        max_epochs=1,
        batch_size=8,
        n_estimators=1,
        pretrained=False,
        validation_fraction=None,
        random_state=0,
    )


def _finetune_survival():
    """The same tiny network fine-tuned against the Cox partial likelihood."""
    params = _finetune().get_params()
    params.pop("class_weight")
    params.pop("threshold")
    return FineTuneSurvival(**params)


ESTIMATORS: list = [
    # image estimators: their tags say they take image arrays, not sklearn's tabular test data,
    # so sklearn runs only its data-free checks on them (clone, params, repr, tags, unfitted);
    # their own test modules cover fit/transform invariances on images
    PretrainedCNNFeatures(input_size=32, batch_size=8),
    RadiomicsFeatures(features=["firstorder"], missing_mask="whole"),
    AdaBN(PretrainedCNNFeatures(input_size=32, batch_size=8)),
    AutoHarmonizer(PretrainedCNNFeatures(input_size=32, batch_size=8), cv=2, random_state=0),
    SpacingResampler(),
    HistogramMatcher(),
    IntensityWindow(),
    IntensityStandardizer(),
    _finetune(),
    _finetune_survival(),
    LesionCropper(),
    # feature-level harmonization and domain adaptation (skada)
    ComBatHarmonizer(),
    DomainAdapter("coral", target_sites="B"),
    make_site_da_pipeline("coral", LogisticRegression(), target_sites="B"),
    # probability calibrators
    TemperatureScaling(),
    BiasCorrectedTemperatureScaling(),
    VectorScaling(),
    LabelShiftAdapter(LogisticRegression(), cv=2, random_state=0),
    # Optuna search (over a plain sklearn estimator: fast, the same code path)
    TransferSearchCV(
        LogisticRegression(),
        param_distributions={"C": FloatDistribution(0.1, 10.0, log=True)},
        n_trials=2,
        cv=2,
        random_state=0,
    ),
    # survival
    CoxPHSurvival(penalizer=0.1),
    SelectKBestSurvival(k=2),
    CorrelationClusterSelector(),
    SurvivalEnsemble([("a", CoxPHSurvival(penalizer=0.1)), ("b", CoxPHSurvival(penalizer=1.0))]),
]

# {estimator class name: {check name: reason}}
EXPECTED_FAILED_CHECKS: dict[str, dict[str, str]] = {
    "TemperatureScaling": dict.fromkeys(_CAL_CHECKS, _CAL),
    "BiasCorrectedTemperatureScaling": dict.fromkeys(_CAL_CHECKS, _CAL),
    "VectorScaling": dict.fromkeys(_CAL_CHECKS, _CAL),
    "ComBatHarmonizer": dict.fromkeys(_COMBAT_CHECKS, _COMBAT),
    "DomainAdapter": dict.fromkeys(_DA_ADAPTER_CHECKS, _DA),
    "SiteDAPipeline": dict.fromkeys(_DA_PIPELINE_CHECKS, _DA),
    "CoxPHSurvival": dict.fromkeys(_COX_CHECKS, _SURV),
    "SelectKBestSurvival": dict.fromkeys(_SEL_CHECKS, _SURV),
    "SurvivalEnsemble": dict.fromkeys(_ENSEMBLE_CHECKS, _SURV),
}


def _expected_failed_checks(estimator) -> dict[str, str]:
    return EXPECTED_FAILED_CHECKS.get(type(estimator).__name__, {})


def test_every_public_estimator_is_checked():
    import inspect

    from sklearn.base import BaseEstimator

    import skrtl

    public = {
        name
        for name in skrtl.__all__
        if inspect.isclass(getattr(skrtl, name))
        and issubclass(getattr(skrtl, name), BaseEstimator)
    }
    checked = {type(est).__name__ for est in ESTIMATORS}
    assert public <= checked, f"estimators without sklearn checks: {sorted(public - checked)}"


if ESTIMATORS:

    @parametrize_with_checks(ESTIMATORS, expected_failed_checks=_expected_failed_checks)
    def test_sklearn_compatible_estimator(estimator, check):
        check(estimator)


# --------------------------------------------------------------------------------------------
# image-estimator checks: sklearn's checks cannot feed images, so these run the invariances
# that matter (clone, pickle, idempotent fit, subset invariance) on tiny image frames
# --------------------------------------------------------------------------------------------


def _tiny_frame():
    X, y, masks = blob_images(n=12)
    from skrtl import make_image_frame

    frame = make_image_frame(
        X * 40 + 100, masks=masks, spacing=(0.7, 0.7), sites=list("AAAABBBBCCCC")
    )
    return frame, y


def _numeric(out):
    """A numeric array of an estimator's output (images of an image frame stacked)."""
    if isinstance(out, pd.DataFrame):
        if "image" in out.columns:
            return np.stack([np.asarray(v, dtype=np.float64) for v in out["image"]])
        return out.to_numpy(dtype=np.float64)
    return np.asarray(out, dtype=np.float64)


# (id, factory, method, fit uses y, fit params maker)
IMAGE_ESTIMATORS = [
    ("features", lambda: PretrainedCNNFeatures(input_size=32, precision="fp32"), "transform"),
    ("finetune", _finetune, "predict_proba"),
    ("finetune_survival", _finetune_survival, "predict"),
    ("adabn", lambda: AdaBN(PretrainedCNNFeatures(input_size=32, precision="fp32")), "transform"),
    ("radiomics", lambda: RadiomicsFeatures(features=["firstorder"]), "transform"),
    ("spacing", lambda: SpacingResampler(target_spacing=(1.0, 1.0)), "transform"),
    ("histogram", lambda: HistogramMatcher(), "transform"),
    ("window", lambda: IntensityWindow(windows=(100.0, 80.0)), "transform"),
    ("standardizer", lambda: IntensityStandardizer(), "transform"),
]


def _fit(est, frame, y):
    if isinstance(est, FineTuneSurvival):  # a survival target from the class labels
        time = 10.0 - 4.0 * y + 0.25 * np.arange(len(y))
        return est.fit(frame, make_survival_target(np.arange(len(y)) % 3 != 0, time))
    if isinstance(est, AdaBN):
        sites = frame["site"].to_numpy()
        return est.fit(frame[sites != "C"], y[sites != "C"], X_target=frame[sites == "C"])
    return est.fit(frame, y)


@pytest.mark.parametrize(
    "name, make, method", IMAGE_ESTIMATORS, ids=[e[0] for e in IMAGE_ESTIMATORS]
)
def test_image_estimator_invariances(name, make, method):
    if name == "radiomics":
        pytest.importorskip("radiomics")
    frame, y = _tiny_frame()
    est = make()
    # clone: same parameters, nothing fitted
    twin = clone(est)
    assert twin.get_params(deep=False).keys() == est.get_params(deep=False).keys()
    assert not [k for k in vars(twin) if k.endswith("_") and not k.startswith("_")]
    _fit(est, frame, y)
    out = _numeric(getattr(est, method)(frame))
    assert out.shape[0] == len(frame) and np.all(np.isfinite(out))
    # pickle round trip: identical output
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_allclose(_numeric(getattr(again, method)(frame)), out, rtol=1e-6, atol=1e-6)
    # idempotent fit: refitting on the same data gives the same output
    _fit(est, frame, y)
    np.testing.assert_allclose(_numeric(getattr(est, method)(frame)), out, rtol=1e-5, atol=1e-5)
    # subset invariance: a subset of rows (another batch composition) gives the same rows
    rows = np.array([7, 2, 10, 0])
    part = _numeric(getattr(est, method)(frame.iloc[rows]))
    np.testing.assert_allclose(part, out[rows], rtol=1e-4, atol=1e-5)
