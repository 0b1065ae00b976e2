"""Data sets: a multi-site lesion phantom with known ground truth, MedMNIST loaders, and
simulated scanner shifts."""

from ._medmnist import load_medmnist, shared_data_dir
from ._phantom import default_site_params, make_lesion_phantom, power_law_field
from ._scanner import (
    SCANNER_MODALITIES,
    ScannerProfile,
    list_scanner_shifts,
    plot_scanner_shifts,
    simulate_scanner,
)

__all__ = [
    "SCANNER_MODALITIES",
    "ScannerProfile",
    "default_site_params",
    "list_scanner_shifts",
    "load_medmnist",
    "make_lesion_phantom",
    "plot_scanner_shifts",
    "power_law_field",
    "shared_data_dir",
    "simulate_scanner",
]
