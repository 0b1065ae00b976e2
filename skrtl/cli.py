"""Command line interface: ``skrtl demo``, ``skrtl layers``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_layers(args: argparse.Namespace) -> int:
    from ._backbone import describe_layers, load_backbone

    model = load_backbone(args.backbone, pretrained=False, num_classes=args.num_classes)
    table = describe_layers(model)
    print(f"Transfer layers of {args.backbone} (L = {len(table)}):")
    print(table[["name", "n_params", "n_tensors"]].to_string())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    run_demo(
        data=args.data,
        output_dir=args.output,
        n_samples=args.n_samples,
        image_size=args.image_size,
        quick=args.quick,
        random_state=args.random_state,
        verbose=0 if args.quiet else 1,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the ``skrtl`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="skrtl",
        description="Radiomics transfer learning with scikit-learn: pretrained CNN features, "
        "harmonization, fine-tuning, label-shift calibration, Optuna tuning, survival.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="run a whole multi-site study offline (phantom data or a MedMNIST .npz file)",
    )
    demo.add_argument("--data", default=None, help="MedMNIST .npz file (default: phantom)")
    demo.add_argument("--output", default="skrtl_demo_report", help="report folder")
    demo.add_argument("--n-samples", type=int, default=360, help="phantom patients")
    demo.add_argument("--image-size", type=int, default=96, help="network input size (px)")
    demo.add_argument("--quick", action="store_true", help="tiny run (about a minute)")
    demo.add_argument("--random-state", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.set_defaults(func=_cmd_demo)

    layers = sub.add_parser("layers", help="print a backbone's transfer layers")
    layers.add_argument("--backbone", default="tf_efficientnet_lite0")
    layers.add_argument("--num-classes", type=int, default=2)
    layers.set_defaults(func=_cmd_layers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``skrtl`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
