"""GPU check: CNN feature throughput and fine-tuning time per epoch on CUDA (issue 20, part 3).

Run it on a machine with an NVIDIA GPU; nothing in CI needs one. Without CUDA it prints why and
exits with status 0, writing nothing.

Measured (lite0, BreastMNIST train images upsampled, or random images when the data folder is
absent):

* **features** -- img/s of a plain fp32 timm loop on the GPU and of ``PretrainedCNNFeatures``
  with ``device="cuda"`` and ``precision="fp32"``, ``"bf16"`` (bfloat16 autocast, where the
  GPU has it), ``"fp16"`` (float16 autocast) and ``"mixed"``; whole ``transform`` (CPU
  preprocessing included, cache off), best of the repeats, every variant timed side by side;
  the relative difference of each variant's features from fp32;
* **fine-tuning** -- seconds per epoch of ``FineTuneClassifier(device="cuda")`` (one network,
  no early stopping), from the difference between a 1-epoch and a 3-epoch fit so that the
  set-up (data preparation, prefix cache) is not counted; again with each value of a
  ``precision`` parameter when the installed ``FineTuneClassifier`` has one.

Usage::

    python benchmarks/device_check.py            # full: 512 images, 224 px
    python benchmarks/device_check.py --quick    # smoke run: 64 images, 96 px

Results: ``results/device.json`` (``results/quick/device.json`` for ``--quick``), schema in
``_common.py``.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from _common import DATA_DIR, Benchmark, Stopwatch, alternate, bench_parser


def _images(n: int, seed: int = 0):
    path = DATA_DIR / "breastmnist.npz"
    if path.is_file():
        from skrtl.datasets import load_medmnist

        X, y = load_medmnist(path, split="train")
        reps = -(-n // len(X))
        return np.concatenate([X] * reps)[:n], np.concatenate([y] * reps)[:n], "breastmnist"
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return X, np.arange(n) % 2, "random uint8 28 x 28"


def bench_features(X, *, size: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from skrtl import PretrainedCNNFeatures, backbone_data_config, load_backbone

    dev = torch.device("cuda")
    model = load_backbone().eval().to(dev)
    cfg = backbone_data_config(model)
    mean = torch.tensor(cfg["mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=dev).view(1, 3, 1, 1)

    def plain():
        outs = []
        with torch.no_grad():
            for i in range(0, len(X), 64):
                x = torch.from_numpy(X[i : i + 64].astype(np.float32) / 255.0)[:, None].to(dev)
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
                x = (x.expand(-1, 3, -1, -1) - mean) / std
                outs.append(model.forward_features(x).mean((2, 3)))
        torch.cuda.synchronize()
        return torch.cat(outs).cpu().numpy()

    precisions = ["fp32", "fp16", "mixed"]
    if torch.cuda.is_bf16_supported():
        precisions.insert(1, "bf16")
    ests = {
        p: PretrainedCNNFeatures(
            device="cuda", precision=p, input_size=size, batch_size=64, cache=False
        ).fit(X[:2])
        for p in precisions
    }
    for est in ests.values():
        est.transform(X[:64])  # build the inference copies, warm up cuDNN
    plain()
    funcs = {
        "plain_fp32": plain,
        **{f"skrtl_{p}": (lambda e=e: e.transform(X)) for p, e in ests.items()},
    }
    seconds, feats = alternate(funcs, repeats)
    ref = feats["skrtl_fp32"]
    out: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "n_images": len(X),
        "input_size": size,
        "batch_size": 64,
    }
    for key, vals in seconds.items():
        out[f"{key}_img_per_s"] = round(len(X) / min(vals), 1)
        rel = np.linalg.norm(feats[key] - ref) / np.linalg.norm(ref)
        out[f"{key}_rel_diff_vs_skrtl_fp32"] = float(f"{rel:.3g}")
    return out


def bench_finetune(X, y, *, size: int, epochs: int) -> dict:
    from skrtl import FineTuneClassifier

    base = dict(
        device="cuda",
        input_size=size,
        n_estimators=1,
        early_stopping=False,
        random_state=0,
    )
    variants = {"default": {}}
    if "precision" in FineTuneClassifier().get_params():
        for p in ("fp32", "bf16", "fp16"):
            variants[p] = {"precision": p}
    out: dict = {"n_images": len(X), "input_size": size, "epochs": epochs}
    for name, extra in variants.items():
        times = {}
        try:
            for n_ep in (1, epochs):
                with Stopwatch() as sw:
                    FineTuneClassifier(**base, **extra, max_epochs=n_ep).fit(X, y)
                times[n_ep] = sw.seconds
        except (ValueError, RuntimeError) as exc:  # a precision this GPU lacks
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        out[f"{name}_fit_1_epoch_s"] = round(times[1], 2)
        out[f"{name}_fit_{epochs}_epochs_s"] = round(times[epochs], 2)
        out[f"{name}_s_per_epoch"] = round((times[epochs] - times[1]) / (epochs - 1), 3)
    return out


def main(argv=None) -> dict:
    parser = bench_parser(__doc__)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "device_check: no CUDA GPU is available on this machine (torch.cuda.is_available() "
            "is False); nothing measured, nothing written. Run it on a GPU machine.",
            flush=True,
        )
        sys.exit(0)
    bench = Benchmark("device", issue=20, args=args)
    quick = bench.quick
    n = 64 if quick else 512
    size = 96 if quick else 224
    X, y, source = _images(n)
    config = {
        "data": source,
        "n_images": n,
        "input_size": size,
        "feature_repeats": 2 if quick else 3,
        "finetune_n_images": 64 if quick else 256,
        "finetune_epochs": 2 if quick else 3,
    }
    rows = []
    notes = [
        "features: every variant timed side by side (best of the repeats), whole transform "
        "with CPU preprocessing; fine-tuning: (fit(E epochs) - fit(1 epoch)) / (E - 1)"
    ]

    def save():
        summary = {f"{r['section']}.{k}": v for r in rows for k, v in r.items()}
        summary = {k: v for k, v in summary.items() if isinstance(v, int | float)}
        bench.write(config=config, results=rows, summary=summary, notes=notes)

    print("== features on CUDA ==", flush=True)
    rows.append(
        {"section": "features", **bench_features(X, size=size, repeats=config["feature_repeats"])}
    )
    print(json.dumps(rows[-1], indent=1), flush=True)
    save()
    print("== fine-tuning on CUDA ==", flush=True)
    m = config["finetune_n_images"]
    rows.append(
        {
            "section": "finetune",
            **bench_finetune(X[:m], y[:m], size=size, epochs=config["finetune_epochs"]),
        }
    )
    print(json.dumps(rows[-1], indent=1), flush=True)
    save()
    return {r["section"]: r for r in rows}


if __name__ == "__main__":
    main()
