"""Fine-tuning speed: skrtl's training loop vs a plain skorch loop, and fit time vs n (issue 20).

**Per epoch** (BreastMNIST train, 546 images at 96 px, lite0, batch 32, AdamW): the same
network and the same network inputs, trained by

* ``skorch (all layers)``: a plain ``skorch.NeuralNetClassifier`` over the timm model, every
  layer trained (what a user writes first);
* ``skorch (k frozen)``: the same with the first ``k`` transfer layers' parameters frozen by
  ``requires_grad=False`` (skorch's ``Freezer``; the frozen layers are still run forward);
* ``skrtl (k = 0)``: :class:`skrtl.FineTuneClassifier` with nothing frozen (like for like with
  the first row);
* ``skrtl default k``: the default freeze depth, whose frozen prefix is computed once per image
  (frozen-prefix cache) and whose BatchNorm statistics stay frozen;
* the same two with ``precision="bf16"`` (bfloat16 autocast of the training forward pass) where
  the estimator offers it.

Each variant trains one network for ``--epochs`` epochs without a validation split; the time
per epoch is skorch's ``dur`` of the epochs after the first (the first includes the prefix
computation and one-off allocations; it is reported separately). Variants run alternately,
``--repeats`` rounds, best round kept.

**Fit time vs n** (PneumoniaMNIST train subsampled, stratified, to 250 / 500 / 1000 / 2000
images): the default fine-tune with one network (``n_estimators=1``) and, at 500 images, the
default ensemble of five; fit seconds, epochs run and validation-split AUC (official val).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_finetune_speed.py
    OMP_NUM_THREADS=1 python benchmarks/bench_finetune_speed.py --quick

Results: ``results/finetune_speed.json``: rows of ``section`` "epoch" and "n_scaling".
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F
from _common import Benchmark, Stopwatch, bench_parser, load_medmnist_splits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from skrtl import FineTuneClassifier, get_transfer_layers, load_backbone, suggest_strategy


def summarise(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        if r["section"] == "epoch":
            out[f"epoch.{r['variant']}.sec_per_epoch"] = r["sec_per_epoch"]
        elif r["section"] == "n_scaling":
            out[f"n_scaling.{r['n']}.{r['members']}.fit_seconds"] = r["fit_seconds"]
    base = out.get("epoch.skorch (all layers).sec_per_epoch")
    for key in list(out):
        if key.startswith("epoch.") and base:
            out[key.replace("sec_per_epoch", "speedup_vs_skorch")] = round(base / out[key], 2)
    return out


def network_inputs(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 grey images -> normalised 3-channel tensors, as skrtl's preprocessing does."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.repeat(1, 3, 1, 1)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)  # lite0's (TF) normalisation
    return ((x - mean) / mean).contiguous()


def plain_skorch(images, y, *, k, epochs, size, seed):
    from skorch import NeuralNetClassifier

    torch.manual_seed(seed)
    model = load_backbone("tf_efficientnet_lite0", num_classes=2)
    if k:
        for layer in get_transfer_layers(model)[:k]:
            for name in layer.param_names:
                model.get_parameter(name).requires_grad_(False)
    net = NeuralNetClassifier(
        model,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.AdamW,
        lr=1e-3,
        batch_size=32,
        max_epochs=epochs,
        train_split=None,
        iterator_train__shuffle=True,
        verbose=0,
    )
    net.fit(network_inputs(images, size), torch.as_tensor(y, dtype=torch.long))
    return list(net.history[:, "dur"])


def skrtl_fit(images, y, *, k, epochs, size, seed, precision=None):
    params = dict(
        n_estimators=1,
        tta=False,
        early_stopping=False,
        validation_fraction=None,
        max_epochs=epochs,
        input_size=size,
        random_state=seed,
    )
    if k is not None:
        params["freeze_depth"] = k
    if precision is not None:
        params["precision"] = precision
    clf = FineTuneClassifier(**params).fit(images, y)
    return list(clf.net_.history[:, "dur"])


def main(argv=None):
    parser = bench_parser(__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args(argv)
    bench = Benchmark("finetune_speed", issue=20, args=args)
    quick = bench.quick
    breast = load_medmnist_splits("breastmnist")
    Xb, yb = breast["train"]
    if quick:
        Xb, yb = Xb[:64], yb[:64]
    size = 32 if quick else args.size
    epochs = 2 if quick else args.epochs
    default_k = suggest_strategy(len(yb)).freeze_depth  # what freeze_depth="auto" resolves to
    has_precision = "precision" in inspect.signature(FineTuneClassifier).parameters
    variants = {
        "skorch (all layers)": lambda: plain_skorch(Xb, yb, k=0, epochs=epochs, size=size, seed=0),
        f"skorch (k={default_k} frozen)": lambda: plain_skorch(
            Xb, yb, k=default_k, epochs=epochs, size=size, seed=0
        ),
        "skrtl (k=0)": lambda: skrtl_fit(Xb, yb, k=0, epochs=epochs, size=size, seed=0),
        f"skrtl default (k={default_k})": lambda: skrtl_fit(
            Xb, yb, k=None, epochs=epochs, size=size, seed=0
        ),
    }
    if has_precision:
        variants["skrtl (k=0) bf16"] = lambda: skrtl_fit(
            Xb, yb, k=0, epochs=epochs, size=size, seed=0, precision="bf16"
        )
        variants[f"skrtl default (k={default_k}) bf16"] = lambda: skrtl_fit(
            Xb, yb, k=None, epochs=epochs, size=size, seed=0, precision="bf16"
        )
    best: dict[str, list[float]] = {}
    for _ in range(1 if quick else args.repeats):
        for name, run in variants.items():
            durs = run()
            if name not in best or np.median(durs[1:]) < np.median(best[name][1:]):
                best[name] = durs
            print(f"{name:28s} first epoch {durs[0]:6.2f} s, then {np.median(durs[1:]):6.2f} s")
    rows = [
        {
            "section": "epoch",
            "variant": name,
            "n_images": len(yb),
            "input_size": size,
            "first_epoch_seconds": round(durs[0], 2),
            "sec_per_epoch": round(float(np.median(durs[1:])), 2),
        }
        for name, durs in best.items()
    ]
    bench.write(config=vars(args), results=rows, summary=summarise(rows), notes=[])

    pneu = load_medmnist_splits("pneumoniamnist", missing="skip")
    if pneu is not None:
        Xp, yp = pneu["train"]
        Xv, yv = pneu["val"]
        sizes = (64, 128) if quick else (250, 500, 1000, 2000)
        plan = [(n, 1) for n in sizes] + [(sizes[1], 5)]
        for n, members in plan:
            Xn, _, yn, _ = train_test_split(Xp, yp, train_size=n, stratify=yp, random_state=0)
            params = dict(n_estimators=members, random_state=0)
            if quick:
                params.update(input_size=32, max_epochs=2)
            clf = FineTuneClassifier(**params)
            with Stopwatch() as sw:
                clf.fit(Xn, yn)
            auc = roc_auc_score(yv, clf.predict_proba(Xv)[:, 1])
            epochs_run = [len(h) for h in clf.histories_]
            rows.append(
                {
                    "section": "n_scaling",
                    "n": n,
                    "members": members,
                    "fit_seconds": round(sw.seconds, 1),
                    "epochs_run": epochs_run,
                    "val_auc": round(auc, 4),
                }
            )
            print(
                f"n={n:5d} members={members} fit {sw.seconds:7.1f} s  epochs {epochs_run}"
                f"  val AUC {auc:.3f}",
                flush=True,
            )
            bench.write(config=vars(args), results=rows, summary=summarise(rows), notes=[])
    bench.write(
        config=vars(args),
        results=rows,
        summary=summarise(rows),
        notes=[
            "sec_per_epoch: median skorch 'dur' of the epochs after the first, best of the "
            "rounds; variants alternate within a round.",
            "n_scaling: default settings (early stopping on a 15 % validation split, 15 epochs "
            "at most) with one network, and the default ensemble of five at one size.",
        ],
    )


if __name__ == "__main__":
    main()
