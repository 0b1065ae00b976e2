"""Tests of the transfer-strategy advisor."""

from __future__ import annotations

import pytest

from skrtl._advisor import StrategyAdvice, suggest_strategy


def test_very_small_data_gets_linear_probe():
    advice = suggest_strategy(40, n_layers=10)
    assert isinstance(advice, StrategyAdvice)
    assert advice.strategy == "linear_probe"
    assert advice.freeze_depth == 9  # everything but the classifier
    assert "few samples" in advice.reason


def test_noisy_labels_get_linear_probe_even_with_more_data():
    advice = suggest_strategy(2000, label_noise="high")
    assert advice.strategy == "linear_probe"
    assert "noise" in advice.reason
    assert suggest_strategy(2000, label_noise=0.3).strategy == "linear_probe"
    assert suggest_strategy(2000, label_noise=0.01).strategy == "finetune"


def test_medium_data_fine_tunes_with_shallow_layers_frozen():
    advice = suggest_strategy(600, domain_gap="low", n_layers=10)
    assert advice.strategy == "finetune"
    assert 1 <= advice.freeze_depth <= 7  # shallow layers frozen, top layers + head train
    assert 0 < advice.gamma < 1
    assert "fine-tune" in advice.reason and f"1..{advice.freeze_depth}" in advice.reason


def test_large_domain_gap_freezes_fewer_layers_and_decays_less():
    low = suggest_strategy(600, domain_gap="low", n_layers=10)
    high = suggest_strategy(600, domain_gap="high", n_layers=10)
    assert high.freeze_depth < low.freeze_depth
    assert high.gamma > low.gamma
    assert "large domain gap" in high.reason


def test_more_data_freezes_fewer_layers():
    depths = [suggest_strategy(n, domain_gap="low").freeze_depth for n in (200, 2000, 20000)]
    assert depths == sorted(depths, reverse=True) and depths[0] > depths[-1]


def test_very_large_clean_data_allows_scratch():
    advice = suggest_strategy(200_000, domain_gap="high", label_noise="low")
    assert advice.strategy == "scratch" and advice.freeze_depth == 0
    assert "scratch" in advice.reason
    # with a small domain gap pretraining is still preferred
    assert suggest_strategy(200_000, domain_gap="low").strategy == "finetune"


def test_per_class_thresholds_scale_with_classes():
    assert suggest_strategy(300, n_classes=2).strategy == "finetune"
    assert suggest_strategy(300, n_classes=10).strategy == "linear_probe"


def test_as_params_fit_the_classifier():
    from skrtl._finetune import FineTuneClassifier

    params = suggest_strategy(600).as_params()
    assert set(params) == {"strategy", "freeze_depth", "gamma", "lr"}
    clf = FineTuneClassifier().set_params(**params)
    assert clf.get_params()["freeze_depth"] == params["freeze_depth"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_samples": 0}, "n_samples"),
        ({"n_samples": 10, "n_classes": 1}, "n_classes"),
        ({"n_samples": 10, "label_noise": "extreme"}, "label_noise"),
        ({"n_samples": 10, "domain_gap": 1.5}, "domain_gap"),
        ({"n_samples": 10, "n_layers": 1}, "n_layers"),
    ],
)
def test_invalid_arguments(kwargs, match):
    n = kwargs.pop("n_samples")
    with pytest.raises(ValueError, match=match):
        suggest_strategy(n, **kwargs)
