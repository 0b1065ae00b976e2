"""Data sets: a multi-site lesion phantom with known ground truth, and MedMNIST loaders."""

from ._medmnist import load_medmnist, shared_data_dir
from ._phantom import default_site_params, make_lesion_phantom, power_law_field

__all__ = [
    "default_site_params",
    "load_medmnist",
    "make_lesion_phantom",
    "power_law_field",
    "shared_data_dir",
]
