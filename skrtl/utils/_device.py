"""Torch devices and the numeric kernels they offer."""

from __future__ import annotations

import torch

__all__ = ["bf16_supported", "can_fuse_on_cpu", "resolve_device"]


def resolve_device(device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise a validated torch device.

    Raises
    ------
    ValueError
        When ``device`` is not a device name, or names CUDA on a machine without it.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {device!r}."
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} but CUDA is not available on this machine; use device='auto' "
            "or 'cpu'."
        )
    return dev


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` has fast bfloat16 kernels (AVX512-BF16 / AMX on CPUs, CUDA >= sm80)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:  # pragma: no cover - exotic builds
            return False
    return False


def can_fuse_on_cpu() -> bool:
    """Whether oneDNN can fuse a pointwise activation into a convolution on this build."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )
