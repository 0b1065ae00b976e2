"""``skrtl demo`` end to end, at the smallest settings."""

from __future__ import annotations

import numpy as np
import pytest

from skrtl._demo import run_demo


def test_run_demo_quick_phantom(tmp_path):
    out = run_demo(
        data=None,
        output_dir=tmp_path / "report",
        n_samples=60,
        image_size=32,
        quick=True,
        random_state=0,
        verbose=0,
    )
    report = tmp_path / "report" / "report.md"
    assert out["report"] == report and report.is_file()
    text = report.read_text()
    assert "# skrtl demo report" in text and "## Results" in text
    assert (tmp_path / "report" / "examples.png").is_file()
    assert (tmp_path / "report" / "diagnostics_target.png").is_file()
    steps = set(out["results"]["step"])
    assert {"harmonization", "label shift", "survival", "transfer"} <= steps
    # the core steps that depend only on finished modules ran without errors
    assert not [n for n in out["notes"] if "failed" in n and "fine-tuning" not in n], out["notes"]
    res = out["results"].set_index(["step", "method", "metric"])
    auc = res.loc[("transfer", "linear probe (features + LogisticRegression)", "ROC AUC")]
    assert 0.0 <= auc["target"] <= 1.0
    assert set(out["diagnosis"]) == {"target", "label_target"}


def test_run_demo_medmnist_file(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 4), ("test", 60)):
        y = rng.integers(0, 2, (n, 1))
        imgs = rng.integers(0, 120, (n, 28, 28)) + 100 * y[:, :, None]
        arrays[f"{split}_images"] = imgs.astype(np.uint8)
        arrays[f"{split}_labels"] = y
    path = tmp_path / "tinymnist.npz"
    np.savez(path, **arrays)
    from skrtl import _demo

    # keep this test light: only the data path and the report, no fine-tuning
    mp = pytest.MonkeyPatch()
    mp.setattr(_demo, "_finetune", lambda *a, **k: None)
    try:
        out = run_demo(data=path, output_dir=tmp_path / "r", n_samples=40, image_size=32,
                       quick=True, verbose=0)  # fmt: skip
    finally:
        mp.undo()
    assert (tmp_path / "r" / "report.md").is_file()
    assert "survival" not in set(out["results"]["step"])
    assert "label shift" in set(out["results"]["step"])


def test_run_demo_errors(tmp_path):
    with pytest.raises(ValueError, match="n_samples"):
        run_demo(output_dir=tmp_path, n_samples=5, verbose=0)
    with pytest.raises(ValueError, match="image_size"):
        run_demo(output_dir=tmp_path, image_size=8, verbose=0)
