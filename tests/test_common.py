"""sklearn's own estimator checks over every skrtl estimator.

Each estimator is listed in ``ESTIMATORS`` with small, fast settings. Checks that cannot pass for
a reason inherent to the estimator (for example image estimators, which cannot take sklearn's
tabular 2-D test data) are listed in ``EXPECTED_FAILED_CHECKS`` with that reason, following
imbalanced-learn's ``test_common.py``.
"""

from __future__ import annotations

from sklearn.utils.estimator_checks import parametrize_with_checks

ESTIMATORS: list = []

# {estimator class name: {check name: reason}}
EXPECTED_FAILED_CHECKS: dict[str, dict[str, str]] = {}


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
