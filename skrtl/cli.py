"""Command line interface: ``skrtl demo``, ``skrtl extract``, ``skrtl layers``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _jobs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or -1, got {text!r}"
        ) from None
    if value == 0 or value < -1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or -1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _fail(command: str, exc: BaseException) -> int:
    print(f"skrtl {command}: error: {exc}", file=sys.stderr)
    return 2


def _cmd_layers(args: argparse.Namespace) -> int:
    from ._backbone import describe_layers, load_backbone

    model = load_backbone(args.backbone, pretrained=False, num_classes=args.num_classes)
    table = describe_layers(model)
    print(f"Transfer layers of {args.backbone} (L = {len(table)}):")
    print(table[["name", "n_params", "n_tensors"]].to_string())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    if args.cohort is None and args.target is not None:
        return _fail("demo", ValueError("--target is used with --cohort CSV only."))
    if args.cohort is not None and args.data is not None:
        return _fail(
            "demo", ValueError("give --data (MedMNIST file) or --cohort (CSV), not both.")
        )
    try:
        run_demo(
            data=args.data,
            cohort=args.cohort,
            target=args.target,
            site_column=args.site_column,
            id_column=args.id_column,
            image_column=args.image_column,
            mask_column=args.mask_column,
            label=args.label,
            time_column=args.time_column,
            event_column=args.event_column,
            target_site=args.target_site,
            mode=args.mode,
            margin_mm=args.margin_mm,
            size_mm=args.size_mm,
            target_spacing=args.spacing,
            crop=not args.no_crop,
            output_dir=args.output,
            n_samples=args.n_samples,
            image_size=args.image_size,
            quick=args.quick,
            random_state=args.random_state,
            verbose=0 if args.quiet else 1,
        )
    except (ValueError, FileNotFoundError, PermissionError, ImportError) as exc:
        return _fail("demo", exc)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from ._extract import extract_cohort

    cnn = not args.no_cnn
    radiomics = bool(args.radiomics) or args.params is not None
    if args.radiomics is False and args.params is not None:
        return _fail("extract", ValueError("--params is a PyRadiomics file; drop --no-radiomics."))
    try:
        res = extract_cohort(
            args.cohort,
            args.output,
            cnn=cnn,
            radiomics=radiomics,
            backbone=args.backbone,
            mode=args.mode,
            layers=args.layers,
            pooling=args.pooling,
            input_size=args.input_size,
            precision=args.precision,
            batch_size=args.batch_size,
            label=args.label,
            params=args.params,
            margin_mm=args.margin_mm,
            size_mm=args.size_mm,
            target_spacing=args.spacing,
            crop=not args.no_crop,
            image_column=args.image_column,
            mask_column=None if args.mask_column.lower() == "none" else args.mask_column,
            site_column=args.site_column,
            id_column=args.id_column,
            n_jobs=args.jobs,
            errors_path=args.errors,
            verbose=0 if args.quiet else 1,
        )
    except KeyboardInterrupt:  # pragma: no cover - interrupted before the batch started
        print("skrtl extract: interrupted.", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, ImportError) as exc:
        return _fail("extract", exc)
    if res.interrupted:
        print(
            f"skrtl extract: interrupted; {res.n_reused + res.n_computed} finished cases are "
            f"saved in {res.store_path}. Rerun the same command to resume.",
            file=sys.stderr,
        )
        return res.exit_code
    if not args.quiet:
        for note in res.notes[:20]:
            print(f"note: {note}", file=sys.stderr)
        if len(res.notes) > 20:
            print(f"note: ... and {len(res.notes) - 20} more warnings", file=sys.stderr)
        print(
            f"{res.n_cases} cases: {res.n_computed} computed, {res.n_reused} taken from "
            f"{res.store_path.name}, {res.n_failed} failed. Features: {res.output}"
            + (f"; failures: {res.errors_path}" if res.n_failed else "")
        )
    return res.exit_code


def build_parser() -> argparse.ArgumentParser:
    """Build the ``skrtl`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="skrtl",
        description="Radiomics transfer learning with scikit-learn: pretrained CNN features, "
        "harmonization, fine-tuning, label-shift calibration, Optuna tuning, survival.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # ---------------------------------------------------------------------------- demo
    demo = sub.add_parser(
        "demo",
        help="run a whole multi-site study offline (phantom cohort, MedMNIST file or your CSV)",
        description="Run a multi-site study and write a report. Default: a phantom cohort "
        "written as NIfTI files and a cohort CSV under OUTPUT/cohort, read back from disk. "
        "--cohort runs the same study on your cohort table.",
    )
    demo.add_argument("--data", default=None, help="MedMNIST .npz file (default: phantom)")
    demo.add_argument("--cohort", default=None, help="your cohort CSV (see skrtl.read_cohort)")
    demo.add_argument("--target", default=None, help="binary label column of --cohort")
    demo.add_argument("--site-column", default="site", help="site column (optional in the CSV)")
    demo.add_argument("--target-site", default=None, help="site held out as the shift target")
    demo.add_argument("--time-column", default="time", help="survival time column (optional)")
    demo.add_argument("--event-column", default="event", help="event column (optional)")
    demo.add_argument("--id-column", default=None)
    demo.add_argument("--image-column", default="image")
    demo.add_argument("--mask-column", default="mask")
    demo.add_argument("--label", default=None, help="mask label: an int or a column name")
    demo.add_argument("--mode", default="auto", choices=["auto", "2d", "2.5d", "3d"])
    demo.add_argument("--margin-mm", type=_positive_float, default=None)
    demo.add_argument("--size-mm", type=_positive_float, default=None)
    demo.add_argument("--spacing", type=_positive_float, default=None, help="crop spacing (mm)")
    demo.add_argument("--no-crop", action="store_true", help="whole images, no lesion crop")
    demo.add_argument("--output", default="skrtl_demo_report", help="report folder")
    demo.add_argument("--n-samples", type=int, default=360, help="phantom patients")
    demo.add_argument("--image-size", type=int, default=96, help="network input size (px)")
    demo.add_argument("--quick", action="store_true", help="tiny run (about a minute)")
    demo.add_argument("--random-state", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.set_defaults(func=_cmd_demo)

    # ---------------------------------------------------------------------------- extract
    ext = sub.add_parser(
        "extract",
        help="CNN / radiomics features of every case of a cohort CSV (resumable)",
        description="Extract features of every case of a cohort table into one CSV row per "
        "case (the table's columns kept). Finished cases are saved as they complete in "
        "OUTPUT_STEM.extract.sqlite; a rerun resumes. Failed cases go to "
        "OUTPUT_STEM.errors.csv. Exit status: 0 all cases succeeded, 1 some failed, 2 bad "
        "arguments or table, 130 interrupted.",
    )
    ext.add_argument("cohort", help="cohort CSV (image, mask and clinical columns)")
    ext.add_argument("-o", "--output", required=True, help="output CSV")
    ext.add_argument("--backbone", default=None, help="timm backbone (default: embedded lite0)")
    ext.add_argument("--mode", default="auto", choices=["auto", "2d", "2.5d", "3d"])
    ext.add_argument("--layers", default="final", help="'final', an index, or e.g. '3,final'")
    ext.add_argument("--pooling", default="avg", choices=["avg", "max", "gem", "avgmax"])
    ext.add_argument("--input-size", type=_positive_int, default=224)
    ext.add_argument("--precision", default="auto", choices=["auto", "mixed", "fp32", "bf16"])
    ext.add_argument("--batch-size", type=_positive_int, default=32)
    ext.add_argument("--label", default=None, help="mask label: an int or a column name")
    ext.add_argument(
        "--radiomics",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="PyRadiomics features (on with --params)",
    )
    ext.add_argument("--no-cnn", action="store_true", help="no CNN features")
    ext.add_argument("--params", default=None, help="PyRadiomics params file (YAML / JSON)")
    ext.add_argument("--margin-mm", type=_positive_float, default=None, help="crop margin")
    ext.add_argument("--size-mm", type=_positive_float, default=None, help="fixed crop size")
    ext.add_argument("--spacing", type=_positive_float, default=None, help="crop spacing (mm)")
    ext.add_argument("--no-crop", action="store_true", help="CNN on the whole image")
    ext.add_argument("--jobs", type=_jobs, default=1, help="cases in parallel (-1: all cores)")
    ext.add_argument("--image-column", default="image")
    ext.add_argument("--mask-column", default="mask", help="'none' for no masks")
    ext.add_argument("--site-column", default=None)
    ext.add_argument("--id-column", default=None, help="unique case ids (default: row number)")
    ext.add_argument("--errors", default=None, help="errors CSV (default OUTPUT_STEM.errors.csv)")
    ext.add_argument("--quiet", action="store_true", help="no progress bar")
    ext.set_defaults(func=_cmd_extract)

    # ---------------------------------------------------------------------------- layers
    layers = sub.add_parser("layers", help="print a backbone's transfer layers")
    layers.add_argument("--backbone", default="tf_efficientnet_lite0")
    layers.add_argument(
        "--num-classes", type=_non_negative_int, default=2, help="classes of the head (0: none)"
    )
    layers.set_defaults(func=_cmd_layers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``skrtl`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
