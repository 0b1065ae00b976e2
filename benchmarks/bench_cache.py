"""A second process reads the features of the first from the persistent cache (issue 19).

Two fresh processes, one after the other, run ``PretrainedCNNFeatures(cache_dir=...)`` over the
same images (BreastMNIST, all 780 images, 224 px): the first computes and stores the features,
the second must read them (no forward pass) and return identical features. A third process
does the same with ``RadiomicsFeatures(cache_dir=...)`` on a smaller subset (PyRadiomics is the
slow step of radiomics studies).

Usage::

    python benchmarks/bench_cache.py          # 780 images at 224 px, radiomics on 120
    python benchmarks/bench_cache.py --quick  # 64 images at 64 px, radiomics on 16
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

from _common import DATA_DIR, Benchmark, bench_parser

_CHILD = r"""
import json, sys, time
import numpy as np
from skrtl import PretrainedCNNFeatures, RadiomicsFeatures, make_image_frame
from skrtl.datasets import load_medmnist
from skrtl._inference import InferenceRunner
import skrtl._radiomics as rad_module
kind, cache, data, n, size, out = sys.argv[1:7]
n, size = int(n), int(size)
calls = {"forward": 0, "pyradiomics": 0}
orig = InferenceRunner.__call__
def counting(self, x, pad_to=None):
    calls["forward"] += int(x.shape[0])
    return orig(self, x, pad_to=pad_to)
InferenceRunner.__call__ = counting
orig_one = rad_module._extract_one
def counting_one(*a, **k):
    calls["pyradiomics"] += 1
    return orig_one(*a, **k)
rad_module._extract_one = counting_one
X = np.concatenate([load_medmnist(data, split=s)[0] for s in ("train", "val", "test")])[:n]
t0 = time.perf_counter()
if kind == "cnn":
    est = PretrainedCNNFeatures(input_size=size, cache=False, cache_dir=cache)
    F = est.fit_transform(X)
else:
    masks = np.zeros(X.shape, bool); masks[:, 6:22, 6:22] = True
    frame = make_image_frame(X, masks=masks)
    F = RadiomicsFeatures(features=["firstorder", "glcm"], cache_dir=cache).fit_transform(frame)
seconds = time.perf_counter() - t0
np.save(out, F)
print(json.dumps({"seconds": seconds, **calls}))
"""


def summarise(rows):
    out = {}
    for r in rows:
        out[f"{r['kind']}.run{r['run']}.seconds"] = r["seconds"]
    for kind in ("cnn", "radiomics"):
        runs = [r for r in rows if r["kind"] == kind]
        if len(runs) == 2:
            out[f"{kind}.second_run_recomputed"] = runs[1]["forward"] + runs[1]["pyradiomics"]
            out[f"{kind}.identical"] = runs[1]["identical"]
            out[f"{kind}.speedup"] = runs[0]["seconds"] / max(runs[1]["seconds"], 1e-9)
    return out


def main(argv=None) -> int:
    args = bench_parser(__doc__).parse_args(argv)
    bench = Benchmark("cache", issue=19, args=args)
    data = DATA_DIR / "breastmnist.npz"
    if not data.is_file():
        sys.exit(f"{data} not found (set SKRTL_DATA_DIR)")
    n, size, n_rad = (64, 64, 16) if bench.quick else (780, 224, 120)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, count in (("cnn", n), ("radiomics", n_rad)):
            outs = []
            for run in (1, 2):
                out = f"{tmp}/{kind}{run}.npy"
                proc = subprocess.run(
                    [sys.executable, "-c", _CHILD, kind, f"{tmp}/cache", str(data), str(count),
                     str(size), out],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                row = {"kind": kind, "run": run, "n_images": count, "input_size": size}
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                outs.append(out)
                if run == 2:
                    import numpy as np

                    row["identical"] = bool(np.array_equal(np.load(outs[0]), np.load(out)))
                rows.append(row)
                print(
                    f"{kind:9s} process {run}: {row['seconds']:7.2f} s, forward passes "
                    f"{row['forward']}, PyRadiomics calls {row['pyradiomics']}",
                    flush=True,
                )
    bench.write(
        config={"n_images": n, "input_size": size, "n_radiomics": n_rad},
        results=rows,
        summary=summarise(rows),
        notes=["each run is a fresh process; the second must read everything from cache_dir"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
