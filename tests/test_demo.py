"""``skrtl demo`` end to end, at the smallest settings."""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
import pytest
from _browser import find_chromium, render

from skrtl import read_cohort
from skrtl._demo import run_demo
from skrtl.cli import main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """The quick phantom demo, run once for the tests of its outputs."""
    folder = tmp_path_factory.mktemp("demo") / "report"
    out = run_demo(
        data=None,
        output_dir=folder,
        n_samples=60,
        image_size=32,
        quick=True,
        random_state=0,
        verbose=0,
    )
    return folder, out


def test_run_demo_quick_phantom(quick_demo):
    folder, out = quick_demo
    tmp_path = folder.parent
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
    # the study ran from files: NIfTI images and masks and a cohort CSV under the output
    csv = out["cohort"]
    assert csv == tmp_path / "report" / "cohort" / "cohort.csv" and csv.is_file()
    cohort = read_cohort(csv, id="id")
    assert len(cohort) == 60 and cohort["image"].str.endswith(".nii.gz").all()
    assert {"site", "malignant", "time", "event"} <= set(cohort.columns)
    assert "every step reads the images from those files" in text
    # saliency maps of a few images per site, in the tables and as figures
    assert "saliency" in steps and "## Saliency maps" in text
    for name in ("saliency_finetune.png", "saliency_probe.png"):
        assert (folder / name).is_file()
    share = res.loc[("saliency", "probe CAM (l9)", "share in lesion")]
    assert 0.0 <= share["source"] <= 1.0


def test_demo_html_report_is_self_contained(quick_demo):
    folder, out = quick_demo
    page = out["html"].read_text()
    assert out["html"] == folder / "report.html"
    for heading in ("Results", "Example images per site", "Saliency maps", "Shift diagnostics",
                    "Timings", "Simulated scanners"):  # fmt: skip
        assert f">{heading}" in page, heading
    # every figure is embedded, nothing is loaded from elsewhere
    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert len(srcs) >= 6 and all(src.startswith("data:image/png;base64,") for src in srcs)
    assert not re.search(r'(?:src|href)="(?!data:|#)', page)
    assert "<script" not in page


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium (apt-get install chromium)")
def test_demo_html_report_renders_in_a_browser(quick_demo, tmp_path):
    folder, out = quick_demo
    page = render(out["html"], screenshot=tmp_path / "report.png")
    assert page["title"] == "skrtl demo report"
    assert len(page["images"]) >= 6
    assert all(img["complete"] and img["width"] > 0 for img in page["images"]), page["images"]
    assert page["console_errors"] == [] and page["exceptions"] == []
    assert page["log_errors"] == []
    assert (tmp_path / "report.png").stat().st_size > 10_000
    # the check itself can fail: a broken image and a console error are seen
    broken = tmp_path / "broken.html"
    broken.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        '<img src="missing.png"><script>console.error("boom")</script></body></html>'
    )
    bad = render(broken)
    assert [img["width"] for img in bad["images"]] == [0]
    assert bad["console_errors"] == ["boom"]


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


def test_run_demo_on_a_user_cohort_of_volumes(tmp_path, monkeypatch):
    from _cohort_fixtures import write_cohort

    from skrtl import _demo

    csv = write_cohort(tmp_path / "data", n=32, second_label=())
    monkeypatch.setattr(_demo, "_finetune", lambda *a, **k: None)  # keep the test light
    out = run_demo(
        cohort=csv,
        target="malignant",
        site_column="hospital",
        id_column="patient",
        label="Label",
        output_dir=tmp_path / "r",
        image_size=32,
        quick=True,
        verbose=0,
    )
    text = (tmp_path / "r" / "report.md").read_text()
    assert "32 cases, target 'malignant'" in text and "mode='2.5d', lesion crops" in text
    steps = set(out["results"]["step"])
    assert {"harmonization", "label shift", "survival", "transfer"} <= steps
    assert not [n for n in out["notes"] if "failed" in n], out["notes"]
    # no site and no survival columns: those steps are skipped, with notes
    table = pd.read_csv(csv).drop(columns=["hospital", "time", "event"])
    table.to_csv(tmp_path / "data" / "plain.csv", index=False)
    out = run_demo(cohort=tmp_path / "data" / "plain.csv", target="malignant", label="Label",
                   output_dir=tmp_path / "r2", image_size=32, quick=True, verbose=0)  # fmt: skip
    assert set(out["results"]["step"]) == {"transfer", "saliency"}
    assert any("site-shift steps are skipped" in n for n in out["notes"])
    assert any("survival step is skipped" in n for n in out["notes"])
    with pytest.raises(ValueError, match="must be binary"):
        run_demo(cohort=csv, target="age", output_dir=tmp_path / "r3", label="Label", verbose=0)
    with pytest.raises(ValueError, match="needs --target"):
        run_demo(cohort=csv, output_dir=tmp_path / "r3", verbose=0)


def test_run_demo_errors(tmp_path, monkeypatch):
    from skrtl import _demo

    with pytest.raises(ValueError, match="n_samples"):
        run_demo(output_dir=tmp_path, n_samples=5, verbose=0)
    with pytest.raises(ValueError, match="image_size"):
        run_demo(output_dir=tmp_path, image_size=8, verbose=0)
    text = tmp_path / "notes.txt"
    text.write_text("not an archive\n")
    with pytest.raises(ValueError, match=r"notes\.txt' is not a MedMNIST \.npz file"):
        run_demo(data=text, output_dir=tmp_path / "r", verbose=0)
    np.save(tmp_path / "images.npy", np.zeros((4, 28, 28)))
    with pytest.raises(ValueError, match=r"holds a single array \(a \.npy file"):
        run_demo(data=tmp_path / "images.npy", output_dir=tmp_path / "r", verbose=0)
    # an output folder that cannot be written fails at once, before any step runs
    monkeypatch.setattr(_demo, "_phantom_data", lambda *a, **k: pytest.fail("study started"))
    with pytest.raises(PermissionError, match="cannot create the report folder"):
        run_demo(output_dir=text / "report", verbose=0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_run_demo_read_only_output(tmp_path, monkeypatch):
    from skrtl import _demo

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    monkeypatch.setattr(_demo, "_phantom_data", lambda *a, **k: pytest.fail("study started"))
    try:
        with pytest.raises(PermissionError, match="cannot write to the report folder"):
            run_demo(output_dir=folder, verbose=0)
    finally:
        folder.chmod(0o700)


def test_cli_errors(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("x")
    assert main(["demo", "--data", str(text), "--output", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is not a MedMNIST .npz file" in err and "allow_pickle" not in err
    assert main(["demo", "--target", "y", "--output", str(tmp_path / "r")]) == 2
    assert "--target is used with --cohort" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["layers", "--num-classes", "-3"])
    assert "expected an integer >= 0, got '-3'" in capsys.readouterr().err
