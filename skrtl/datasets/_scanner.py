"""Simulated scanner shifts: realistic acquisition corruptions at five severities.

A model validated at one hospital meets images from another scanner: a softer or sharper
reconstruction kernel, more noise at a lower dose, another intensity look-up table, coarser
pixels or thicker slices, and modality-specific artefacts. :func:`simulate_scanner` applies such
shifts to images, in the spirit of ImageNet-C (Hendrycks & Dietterich 2019) and MedMNIST-C
(Di Salvo et al. 2024), so that a harmonization method can be tested on shifts it was not tuned
on. Every shift has five severities of increasing strength (severity 0 returns the images
unchanged), and shifts compose: a list of kinds, or a :class:`ScannerProfile`.

Intensities stay in the image's own units. Each image is mapped to ``u = (x - lo) / (hi - lo)``
with a value range ``(lo, hi)`` (``(0, 255)`` for ``uint8``, ``(-1024, 3071)`` HU for
``modality="ct"``, else the image's own minimum and maximum, or ``value_range``), corrupted, and
mapped back; ``uint8`` images stay ``uint8`` in ``[0, 255]`` and CT images stay in Hounsfield
units (CT amounts such as noise or ring amplitude are given in HU). Spatial amounts are given
in pixels of an image of 64 pixels or less and scale with the in-plane side above that, so a
severity looks alike at any resolution.

Randomness comes from ``random_state`` only (never the global numpy generator); each image gets
its own child generator, so image ``i`` is corrupted the same way whatever the batch it is in.
The random draws of a shift do not depend on the severity, so, for a fixed ``random_state``,
a higher severity is the same corruption made stronger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral

import numpy as np
import pandas as pd
from scipy import ndimage

__all__ = [
    "SCANNER_MODALITIES",
    "ScannerProfile",
    "list_scanner_shifts",
    "plot_scanner_shifts",
    "simulate_scanner",
]

SCANNER_MODALITIES = ("ct", "mr", "us", "xray")
_ALL = SCANNER_MODALITIES
_CT_RANGE = (-1024.0, 3071.0)
_CT_WINDOW_LEVEL = 40.0  # soft-tissue window level (HU)
_MAX_SEVERITY = 5


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Shift:
    name: str
    modalities: tuple[str, ...]
    parameter: str
    values: tuple  # five severities, relative units (fraction of the value range) or pixels
    description: str
    ct_values: tuple | None = None  # five severities in HU when modality="ct"
    volumes_only: bool = False


_SHIFTS: dict[str, _Shift] = {}


def _register(*args, **kwargs) -> None:
    s = _Shift(*args, **kwargs)
    _SHIFTS[s.name] = s


_register(
    "blur",
    _ALL,
    "Gaussian sigma (px)",
    (0.5, 0.8, 1.1, 1.5, 2.0),
    "Soft reconstruction kernel / lower resolving power: in-plane Gaussian blur.",
)
_register(
    "sharpen",
    _ALL,
    "unsharp-mask gain (sigma 1 px)",
    (0.4, 0.8, 1.2, 1.8, 2.5),
    "Sharp (bone / edge-enhancing) reconstruction kernel: unsharp masking, which also "
    "amplifies the image's own noise.",
)
_register(
    "gaussian_noise",
    _ALL,
    "noise SD (fraction of range; HU for CT)",
    (0.02, 0.035, 0.05, 0.075, 0.1),
    "Electronic / thermal noise: additive white Gaussian noise; for modality='mr' the "
    "magnitude of complex Gaussian noise (Rician).",
    ct_values=(8.0, 15.0, 25.0, 40.0, 60.0),
)
_register(
    "poisson_noise",
    ("xray",),
    "photons at full scale",
    (600.0, 300.0, 150.0, 75.0, 35.0),
    "Lower dose in projection radiography: quantum (Poisson) noise, signal dependent.",
)
_register(
    "ct_low_dose",
    ("ct",),
    "noise SD (fraction of range; HU for CT)",
    (0.02, 0.035, 0.05, 0.075, 0.1),
    "Lower tube current in CT: noise with the CT noise-power spectrum (ramp filter times "
    "apodisation: correlated, grainy), independent between slices.",
    ct_values=(10.0, 20.0, 35.0, 50.0, 75.0),
)
_register(
    "gamma",
    ("mr", "us", "xray"),
    "gamma exponent",
    (1.2, 1.4, 1.7, 2.0, 2.5),
    "Vendor display curve: power-law (gamma) look-up table, darker mid-tones.",
)
_register(
    "contrast",
    _ALL,
    "contrast factor (about the image mean; about water for CT)",
    (0.85, 0.72, 0.6, 0.5, 0.4),
    "Lower contrast (flatter look-up table); for CT, HU scaled about water (0 HU) as with "
    "another tube voltage or calibration.",
    ct_values=(1.04, 1.08, 1.12, 1.18, 1.25),
)
_register(
    "brightness",
    _ALL,
    "gain (HU offset for CT)",
    (1.1, 1.2, 1.3, 1.45, 1.6),
    "Higher gain (brighter, saturating at the top of the range); for CT a HU calibration offset.",
    ct_values=(5.0, 10.0, 20.0, 30.0, 45.0),
)
_register(
    "window",
    _ALL,
    "window width (fraction of the content range; HU for CT)",
    (0.9, 0.75, 0.6, 0.5, 0.4),
    "Images exported through a display window: intensities outside the window saturate (the "
    "window is stretched over the content range); for CT a soft-tissue window at 40 HU "
    "clips the HU values outside it.",
    ct_values=(1500.0, 1000.0, 700.0, 400.0, 250.0),
)
_register(
    "lut",
    ("mr", "us", "xray"),
    "sigmoid slope",
    (3.0, 5.0, 7.0, 9.0, 12.0),
    "Vendor look-up table: sigmoid (S-shaped) curve as the DICOM VOI LUT function SIGMOID.",
)
_register(
    "downsample",
    _ALL,
    "in-plane downsampling factor",
    (1.5, 2.0, 2.5, 3.0, 4.0),
    "Smaller acquisition matrix: anti-aliased in-plane downsampling, then linear "
    "interpolation back to the original size.",
)
_register(
    "thick_slices",
    _ALL,
    "slice thickness (slices)",
    (2, 3, 4, 6, 8),
    "Thicker slices: slabs of consecutive slices averaged (partial volume), then linear "
    "interpolation back to the original depth. Volumes only.",
    volumes_only=True,
)
_register(
    "ring",
    ("ct",),
    "ring amplitude (fraction of range; HU for CT)",
    (0.03, 0.05, 0.08, 0.12, 0.16),
    "Miscalibrated detector channels in CT: concentric bright and dark rings around the "
    "rotation axis, the same in every slice (2 to 10 rings with severity).",
    ct_values=(15.0, 30.0, 50.0, 80.0, 120.0),
)
_register(
    "streak",
    ("ct",),
    "streak amplitude (fraction of range; HU for CT)",
    (0.04, 0.08, 0.12, 0.18, 0.25),
    "Metal / photon-starvation streaks in CT: bright and dark lines through one point (in the "
    "mask when given), fading with distance (2 to 12 streaks with severity).",
    ct_values=(40.0, 80.0, 130.0, 200.0, 300.0),
)
_register(
    "speckle",
    ("us",),
    "speckle fraction",
    (0.15, 0.25, 0.4, 0.55, 0.75),
    "Ultrasound speckle: multiplicative Rayleigh-distributed grain, elongated laterally "
    "(axial along the rows).",
)
_register(
    "bias_field",
    ("mr",),
    "maximum relative gain change",
    (0.1, 0.2, 0.3, 0.45, 0.6),
    "MR coil sensitivity / B1 inhomogeneity: smooth multiplicative bias field (2-D or 3-D).",
)

_N_RINGS = (2, 3, 5, 7, 10)
_N_STREAKS = (2, 4, 6, 9, 12)


# --------------------------------------------------------------------------------------------
# profiles
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScannerProfile:
    """A simulated scanner: several shifts applied in order.

    Parameters
    ----------
    steps : sequence of str or (str, int or None)
        Shift names (see :func:`list_scanner_shifts`), each optionally with its own severity.
        A step without a severity (or with ``None``) takes the ``severity`` given to
        :func:`simulate_scanner`.
    name : str, default="custom"
    modality : {"ct", "mr", "us", "xray"} or None, default=None
        Default modality when :func:`simulate_scanner` gets none.
    description : str, default=""

    Examples
    --------
    >>> profile = ScannerProfile([("ct_low_dose", 4), "blur"], name="cheap_ct", modality="ct")
    >>> profile.resolve(2)
    (('ct_low_dose', 4), ('blur', 2))
    """

    steps: tuple = field(default_factory=tuple)
    name: str = "custom"
    modality: str | None = None
    description: str = ""

    def __post_init__(self):
        if isinstance(self.steps, str) or not isinstance(self.steps, Sequence):
            raise TypeError(
                f"ScannerProfile steps must be a sequence of shift names or (name, severity) "
                f"pairs, got {self.steps!r}."
            )
        steps = []
        for step in self.steps:
            kind, sev = (step, None) if isinstance(step, str) else tuple(step)
            if kind not in _SHIFTS:
                raise ValueError(
                    f"ScannerProfile step {kind!r} is not a scanner shift; known shifts: "
                    f"{sorted(_SHIFTS)!r}."
                )
            if sev is not None:
                _check_severity(sev)
                sev = int(sev)
            steps.append((kind, sev))
        if not steps:
            raise ValueError("ScannerProfile needs at least one step.")
        if self.modality is not None and self.modality not in SCANNER_MODALITIES:
            raise ValueError(
                f"modality={self.modality!r} is not one of {SCANNER_MODALITIES!r} (or None)."
            )
        object.__setattr__(self, "steps", tuple(steps))

    def resolve(self, severity: int) -> tuple[tuple[str, int], ...]:
        """The steps with every missing severity set to ``severity``."""
        return tuple((k, severity if s is None else s) for k, s in self.steps)


_PROFILES: dict[str, ScannerProfile] = {
    p.name: p
    for p in (
        ScannerProfile(
            ("ct_low_dose", "blur"),
            name="ct_low_dose_soft_kernel",
            modality="ct",
            description="Low-dose CT reconstructed with a soft kernel (noise, then blur).",
        ),
        ScannerProfile(
            ("ct_low_dose", "sharpen"),
            name="ct_sharp_kernel",
            modality="ct",
            description="CT with a sharp kernel, which amplifies the quantum noise.",
        ),
        ScannerProfile(
            ("ring", "streak", "ct_low_dose"),
            name="ct_artefacts",
            modality="ct",
            description="Old CT scanner: ring and streak artefacts with more noise.",
        ),
        ScannerProfile(
            ("bias_field", "downsample", "gaussian_noise"),
            name="mr_low_field",
            modality="mr",
            description="Low-field MR: bias field, coarser matrix, more (Rician) noise.",
        ),
        ScannerProfile(
            ("speckle", "lut", "blur"),
            name="us_other_vendor",
            modality="us",
            description="Another ultrasound vendor: coarser speckle, S-shaped LUT, softer.",
        ),
        ScannerProfile(
            ("poisson_noise", "gamma"),
            name="xray_low_dose",
            modality="xray",
            description="Low-dose radiograph displayed with another gamma.",
        ),
        ScannerProfile(
            ("downsample", "blur", "gaussian_noise", "contrast"),
            name="legacy_scanner",
            description="Any modality: older device, lower resolution, noise and contrast.",
        ),
    )
}


def list_scanner_shifts() -> pd.DataFrame:
    """The scanner shifts and built-in scanner profiles of :func:`simulate_scanner`.

    Returns
    -------
    pandas.DataFrame
        One row per shift or profile, columns ``name``, ``type`` (``"shift"`` or
        ``"profile"``), ``modality`` (the modalities it is realistic for), ``volumes_only``,
        ``parameter`` (what the severity controls), ``severities`` (its five values, in the
        units of ``parameter``), ``ct_severities`` (values in HU used with
        ``modality="ct"``, or ``None``) and ``description``.

    Examples
    --------
    >>> table = list_scanner_shifts()
    >>> {"blur", "ring", "speckle", "bias_field"} <= set(table["name"])
    True
    """
    rows = []
    for s in _SHIFTS.values():
        rows.append(
            {
                "name": s.name,
                "type": "shift",
                "modality": ", ".join(s.modalities) if s.modalities != _ALL else "any",
                "volumes_only": s.volumes_only,
                "parameter": s.parameter,
                "severities": tuple(s.values),
                "ct_severities": None if s.ct_values is None else tuple(s.ct_values),
                "description": s.description,
            }
        )
    for p in _PROFILES.values():
        rows.append(
            {
                "name": p.name,
                "type": "profile",
                "modality": p.modality or "any",
                "volumes_only": False,
                "parameter": " + ".join(k for k, _ in p.steps),
                "severities": None,
                "ct_severities": None,
                "description": p.description,
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _check_severity(severity) -> int:
    if isinstance(severity, bool) or not isinstance(severity, Integral):
        raise ValueError(
            f"severity must be an integer from 0 (no shift) to {_MAX_SEVERITY}, got {severity!r}."
        )
    if not 0 <= severity <= _MAX_SEVERITY:
        raise ValueError(
            f"severity={severity!r} is out of range; use 1 (mild) to {_MAX_SEVERITY} (severe), "
            "or 0 for no shift."
        )
    return int(severity)


def _resolve_kind(kind, severity: int) -> tuple[tuple[tuple[str, int], ...], str | None]:
    """Return ((shift, severity), ...) and the profile's default modality."""
    if isinstance(kind, ScannerProfile):
        return kind.resolve(severity), kind.modality
    if isinstance(kind, str):
        if kind in _PROFILES:
            return _PROFILES[kind].resolve(severity), _PROFILES[kind].modality
        if kind in _SHIFTS:
            return ((kind, severity),), None
        raise ValueError(
            f"kind={kind!r} is not a scanner shift or profile. Shifts: {sorted(_SHIFTS)!r}; "
            f"profiles: {sorted(_PROFILES)!r} (see skrtl.datasets.list_scanner_shifts())."
        )
    if isinstance(kind, Sequence) and len(kind) > 0:
        profile = ScannerProfile(tuple(kind))
        return profile.resolve(severity), None
    raise TypeError(
        f"kind must be a shift name, a profile name, a list of shift names / (name, severity) "
        f"pairs or a ScannerProfile, got {kind!r}."
    )


def _check_modality(steps, modality, vol: bool) -> None:
    if modality is not None and modality not in SCANNER_MODALITIES:
        raise ValueError(
            f"modality={modality!r} is not one of {SCANNER_MODALITIES!r}; pass None for images "
            "of unknown or other modality (every shift allowed, amounts relative to the range)."
        )
    for kind, _ in steps:
        s = _SHIFTS[kind]
        if modality is not None and modality not in s.modalities:
            raise ValueError(
                f"kind={kind!r} simulates a {'/'.join(s.modalities)} effect, not a realistic "
                f"shift for modality={modality!r}. Choose another shift (list_scanner_shifts()) "
                "or pass modality=None to apply it anyway."
            )
        if s.volumes_only and not vol:
            raise ValueError(
                f"kind={kind!r} changes the slice thickness and needs volumes (n, D, H, W) or "
                "3-D images in a frame; got 2-D images."
            )


def _make_rng(random_state) -> np.random.SeedSequence:
    if isinstance(random_state, np.random.Generator):
        return np.random.SeedSequence(int(random_state.integers(2**63 - 1)))
    if isinstance(random_state, np.random.RandomState):
        return np.random.SeedSequence(int(random_state.randint(2**31 - 1)))
    if random_state is None:
        return np.random.SeedSequence()
    if isinstance(random_state, Integral) and not isinstance(random_state, bool):
        if random_state < 0:
            raise ValueError(f"random_state must be >= 0, got {random_state!r}.")
        return np.random.SeedSequence(int(random_state))
    raise TypeError(
        f"random_state must be None, an int, a numpy Generator or RandomState, got "
        f"{type(random_state).__name__}."
    )


# --------------------------------------------------------------------------------------------
# per-image context and helpers
# --------------------------------------------------------------------------------------------
@dataclass
class _Ctx:
    rng: np.random.Generator
    lo: float
    scale: float
    ct: bool
    mr: bool
    vol: bool  # a depth axis 0 is present
    px: float  # spatial scale: in-plane side / 64, at least 1
    mask: np.ndarray | None

    def hu(self, value: float) -> float:
        """An amount in HU as a fraction of the value range."""
        return value / self.scale

    def to_x(self, u):
        return self.lo + u * self.scale

    def to_u(self, x):
        return (x - self.lo) / self.scale


def _amount(kind: str, severity: int, ctx: _Ctx) -> float:
    s = _SHIFTS[kind]
    if ctx.ct and s.ct_values is not None:
        return float(s.ct_values[severity - 1])
    return float(s.values[severity - 1])


def _inplane_axes(u: np.ndarray, ctx: _Ctx) -> tuple[int, int]:
    return (1, 2) if ctx.vol else (0, 1)


def _spatial_shape(u: np.ndarray, ctx: _Ctx) -> tuple[int, ...]:
    return u.shape[:-1]  # trailing channel axis


def _gauss(u: np.ndarray, ctx: _Ctx, sigma_inplane, sigma_depth: float = 0.0) -> np.ndarray:
    sig = [0.0] * u.ndim
    a, b = _inplane_axes(u, ctx)
    if np.isscalar(sigma_inplane):
        sigma_inplane = (sigma_inplane, sigma_inplane)
    sig[a], sig[b] = sigma_inplane
    if ctx.vol:
        sig[0] = sigma_depth
    return ndimage.gaussian_filter(u, sigma=sig, mode="reflect", truncate=4.0)


def _resize_axis(u: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Linear interpolation of ``u`` along ``axis`` to ``n_out`` samples (pixel-centre grid)."""
    n_in = u.shape[axis]
    if n_in == n_out:
        return u
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (pos - i0).reshape([-1 if d == axis else 1 for d in range(u.ndim)])
    return np.take(u, i0, axis=axis) * (1.0 - w) + np.take(u, i1, axis=axis) * w


def _inplane_grid(u: np.ndarray, ctx: _Ctx):
    a, b = _inplane_axes(u, ctx)
    h, w = u.shape[a], u.shape[b]
    yy, xx = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    return yy, xx, h, w


def _broadcast_inplane(field2d: np.ndarray, u: np.ndarray, ctx: _Ctx) -> np.ndarray:
    """(H, W) -> shape broadcastable against u (depth and channel axes added)."""
    f = field2d[..., None]
    return f[None] if ctx.vol else f


def _content_range(u: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(u, [0.5, 99.5])
    if hi - lo < 1e-12:
        lo, hi = float(u.min()), float(u.max())
    if hi - lo < 1e-12:
        hi = lo + 1.0
    return float(lo), float(hi)


# --------------------------------------------------------------------------------------------
# the shifts (u: float64, spatial shape + (C,), in units of the value range)
# --------------------------------------------------------------------------------------------
def _blur(u, sev, ctx):
    return _gauss(u, ctx, _amount("blur", sev, ctx) * ctx.px)


def _sharpen(u, sev, ctx):
    gain = _amount("sharpen", sev, ctx)
    return u + gain * (u - _gauss(u, ctx, 1.0 * ctx.px))


def _gaussian_noise(u, sev, ctx):
    sd = _amount("gaussian_noise", sev, ctx)
    sd = ctx.hu(sd) if ctx.ct else sd
    n1 = ctx.rng.standard_normal(u.shape)
    if ctx.mr:
        n2 = ctx.rng.standard_normal(u.shape)
        return np.sqrt((np.maximum(u, 0.0) + sd * n1) ** 2 + (sd * n2) ** 2)
    return u + sd * n1


def _poisson_noise(u, sev, ctx):
    lam = _amount("poisson_noise", sev, ctx)
    return ctx.rng.poisson(lam * np.clip(u, 0.0, None)) / lam


def _ct_low_dose(u, sev, ctx):
    sd = _amount("ct_low_dose", sev, ctx)
    sd = ctx.hu(sd) if ctx.ct else sd
    a, b = _inplane_axes(u, ctx)
    h, w = u.shape[a], u.shape[b]
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fy**2 + fx**2)
    fc = 0.35 / ctx.px
    amp = np.sqrt(f * np.exp(-((f / fc) ** 2)))  # sqrt of the noise-power spectrum
    white = ctx.rng.standard_normal(u.shape)
    spec = np.fft.rfftn(white, axes=(a, b))
    shape = [1] * u.ndim
    shape[a], shape[b] = amp.shape
    noise = np.fft.irfftn(spec * amp.reshape(shape), s=(h, w), axes=(a, b))
    noise /= max(float(noise.std()), 1e-12)
    return u + sd * noise


def _gamma(u, sev, ctx):
    return np.clip(u, 0.0, 1.0) ** _amount("gamma", sev, ctx)


def _contrast(u, sev, ctx):
    c = _amount("contrast", sev, ctx)
    if ctx.ct:
        return ctx.to_u(ctx.to_x(u) * c)
    m = float(u.mean())
    return m + c * (u - m)


def _brightness(u, sev, ctx):
    g = _amount("brightness", sev, ctx)
    if ctx.ct:
        return u + ctx.hu(g)
    return u * g


def _window(u, sev, ctx):
    w = _amount("window", sev, ctx)
    if ctx.ct:
        lo, hi = ctx.to_u(_CT_WINDOW_LEVEL - w / 2), ctx.to_u(_CT_WINDOW_LEVEL + w / 2)
        return np.clip(u, lo, hi)
    clo, chi = _content_range(u)
    centre, half = (clo + chi) / 2, w * (chi - clo) / 2
    v = np.clip((u - (centre - half)) / (2 * half), 0.0, 1.0)
    return clo + v * (chi - clo)


def _lut(u, sev, ctx):
    k = _amount("lut", sev, ctx)
    clo, chi = _content_range(u)
    v = np.clip((u - clo) / (chi - clo), 0.0, 1.0)

    def sig(t):
        return 1.0 / (1.0 + np.exp(-k * (t - 0.5)))

    s = (sig(v) - sig(0.0)) / (sig(1.0) - sig(0.0))
    return clo + s * (chi - clo)


def _downsample(u, sev, ctx):
    factor = _amount("downsample", sev, ctx)
    a, b = _inplane_axes(u, ctx)
    out = _gauss(u, ctx, (factor - 1.0) / 2.0)
    for ax in (a, b):
        n = u.shape[ax]
        m = max(2, int(round(n / factor)))
        out = _resize_axis(_resize_axis(out, ax, m), ax, n)
    return out


def _thick_slices(u, sev, ctx):
    t = int(_amount("thick_slices", sev, ctx))
    d = u.shape[0]
    t = min(t, d)
    n_slab = int(np.ceil(d / t))
    pad = n_slab * t - d
    padded = np.concatenate([u, np.repeat(u[-1:], pad, axis=0)], axis=0) if pad else u
    slabs = padded.reshape((n_slab, t) + u.shape[1:]).mean(axis=1)
    return _resize_axis(slabs, 0, d)


def _ring(u, sev, ctx):
    amp = _amount("ring", sev, ctx)
    amp = ctx.hu(amp) if ctx.ct else amp
    yy, xx, h, w = _inplane_grid(u, ctx)
    n_max = _N_RINGS[-1]
    rng = ctx.rng
    offset = rng.uniform(-0.02, 0.02, size=2) * np.array([h, w])
    radii = rng.uniform(0.08, 0.95, size=n_max) * min(h, w) / 2
    amps = rng.uniform(0.5, 1.0, size=n_max) * rng.choice([-1.0, 1.0], size=n_max)
    r = np.hypot(yy - (h - 1) / 2 - offset[0], xx - (w - 1) / 2 - offset[1])
    width = 0.5 * ctx.px
    field2d = np.zeros((h, w))
    for k in range(_N_RINGS[sev - 1]):
        field2d += amps[k] * np.exp(-0.5 * ((r - radii[k]) / width) ** 2)
    return u + amp * _broadcast_inplane(field2d, u, ctx)


def _streak_origin(u, ctx, h, w):
    rng = ctx.rng
    if ctx.mask is not None and ctx.mask.any():
        m = ctx.mask
        idx = np.argwhere(m)
        pick = idx[rng.integers(len(idx))]
        y0, x0 = (pick[-2], pick[-1])
        z0 = pick[0] if (ctx.vol and m.ndim == 3) else None
    else:
        y0 = rng.uniform(0.25, 0.75) * (h - 1)
        x0 = rng.uniform(0.25, 0.75) * (w - 1)
        z0 = None
    return float(y0), float(x0), z0


def _streak(u, sev, ctx):
    amp = _amount("streak", sev, ctx)
    amp = ctx.hu(amp) if ctx.ct else amp
    yy, xx, h, w = _inplane_grid(u, ctx)
    rng = ctx.rng
    y0, x0, z0 = _streak_origin(u, ctx, h, w)
    n_max = _N_STREAKS[-1]
    angles = rng.uniform(0.0, np.pi, size=n_max)
    amps = rng.uniform(0.6, 1.0, size=n_max) * np.where(np.arange(n_max) % 2 == 0, 1.0, -1.0)
    depth_centre = rng.uniform(0.3, 0.7)
    dist = np.hypot(yy - y0, xx - x0)
    fade = 1.0 / (1.0 + dist / (0.5 * max(h, w)))
    width = 0.6 * ctx.px
    field2d = np.zeros((h, w))
    for k in range(_N_STREAKS[sev - 1]):
        d = np.abs((xx - x0) * np.sin(angles[k]) - (yy - y0) * np.cos(angles[k]))
        field2d += amps[k] * np.exp(-0.5 * (d / width) ** 2)
    field = _broadcast_inplane(field2d * fade, u, ctx)
    if ctx.vol:
        depth = u.shape[0]
        zc = z0 if z0 is not None else depth_centre * (depth - 1)
        z = np.arange(depth, dtype=float)
        field = field * np.exp(-0.5 * ((z - zc) / max(depth / 6.0, 1.0)) ** 2)[:, None, None, None]
    return u + amp * field


def _speckle(u, sev, ctx):
    alpha = _amount("speckle", sev, ctx)
    a, b = _inplane_axes(u, ctx)
    spatial = list(u.shape)
    spatial[-1] = 1  # one speckle pattern for all channels
    re = ctx.rng.standard_normal(spatial)
    im = ctx.rng.standard_normal(spatial)
    sig = [0.0] * u.ndim
    sig[a], sig[b] = 0.6 * ctx.px, 1.0 * ctx.px  # axial (rows), lateral (columns)
    re = ndimage.gaussian_filter(re, sig, mode="wrap")
    im = ndimage.gaussian_filter(im, sig, mode="wrap")
    mag = np.hypot(re, im)
    mag /= max(float(mag.mean()), 1e-12)
    return u * (1.0 - alpha + alpha * mag)


def _bias_field(u, sev, ctx):
    level = _amount("bias_field", sev, ctx)
    spatial = u.shape[:-1]
    coarse = ctx.rng.standard_normal((4,) * len(spatial))
    zoom = [s / 4.0 for s in spatial]
    f = ndimage.zoom(coarse, zoom, order=3, mode="nearest", grid_mode=True)
    # zoom may be off by one pixel on odd sizes: interpolate to the exact shape
    for ax, s in enumerate(spatial):
        f = _resize_axis(f, ax, s)
    f = f - f.mean()
    f /= max(float(np.abs(f).max()), 1e-12)
    return u * np.exp(np.log1p(level) * f)[..., None]


_FUNCS = {
    "blur": _blur,
    "sharpen": _sharpen,
    "gaussian_noise": _gaussian_noise,
    "poisson_noise": _poisson_noise,
    "ct_low_dose": _ct_low_dose,
    "gamma": _gamma,
    "contrast": _contrast,
    "brightness": _brightness,
    "window": _window,
    "lut": _lut,
    "downsample": _downsample,
    "thick_slices": _thick_slices,
    "ring": _ring,
    "streak": _streak,
    "speckle": _speckle,
    "bias_field": _bias_field,
}
assert set(_FUNCS) == set(_SHIFTS)


# --------------------------------------------------------------------------------------------
# containers
# --------------------------------------------------------------------------------------------
def _frame_is_volume(frame: pd.DataFrame, img: np.ndarray, i: int) -> bool:
    if img.ndim != 3:
        return False
    if "mask" in frame.columns:
        m = frame["mask"].iloc[i]
        if m is not None and not (isinstance(m, float) and np.isnan(m)):
            return np.asarray(m).ndim == 3
    if "spacing" in frame.columns:
        sp = frame["spacing"].iloc[i]
        if sp is not None and not (isinstance(sp, float) and np.isnan(sp)):
            return len(tuple(sp)) == 3
    return img.shape[-1] not in (1, 3, 4)


def _check_spatial_dims(spatial_dims):
    if spatial_dims is not None and spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2, 3 or None (infer), got {spatial_dims!r}.")


def _array_layout(arr: np.ndarray, spatial_dims) -> tuple[bool, bool]:
    """(is_volume, has_channels) for an (n, ...) array."""
    if arr.ndim == 3:
        if spatial_dims == 3:
            raise ValueError(
                f"spatial_dims=3 needs volumes of shape (n, D, H, W), got an array of shape "
                f"{arr.shape!r}."
            )
        return False, False
    if arr.ndim == 4:
        if spatial_dims == 2:
            return False, True
        if spatial_dims == 3:
            return True, False
        colour = arr.shape[-1] in (1, 3, 4) and min(arr.shape[1:3]) > 4
        return (not colour), colour
    if arr.ndim == 5 and spatial_dims != 2:
        return True, True
    raise ValueError(
        f"images must have shape (n, H, W), (n, H, W, C) or (n, D, H, W), got an array of shape "
        f"{arr.shape!r}. A single image needs a leading axis: images[None]."
    )


def _value_range(img: np.ndarray, value_range, ct: bool) -> tuple[float, float, bool]:
    """(lo, hi, clip_to_range)."""
    if value_range is not None:
        return float(value_range[0]), float(value_range[1]), True
    if img.dtype == np.uint8:
        return 0.0, 255.0, True
    if ct:
        return _CT_RANGE[0], _CT_RANGE[1], True
    lo, hi = float(img.min()), float(img.max())
    if hi - lo < 1e-12:
        hi = lo + 1.0
    return lo, hi, False


def _check_value_range(value_range):
    if value_range is None:
        return None
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"value_range must be None or a (low, high) pair, got {value_range!r}."
        ) from None
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ValueError(f"value_range={value_range!r} must be finite with high > low.")
    return lo, hi


def _corrupt_one(img, steps, *, vol, channels, modality, mask, value_range, seed):
    if img.dtype == bool or not np.issubdtype(img.dtype, np.number):
        raise ValueError(f"images must be numeric, got dtype {img.dtype!r}.")
    if not np.isfinite(img).all():
        raise ValueError(
            "images contain NaN or infinite values; replace them (np.nan_to_num) first."
        )
    ct = modality == "ct"
    lo, hi, clip = _value_range(img, value_range, ct)
    x = img.astype(np.float64)
    u = (x - lo) / (hi - lo)
    if not channels:
        u = u[..., None]
    inplane = u.shape[1:3] if vol else u.shape[0:2]
    ctx = _Ctx(
        rng=np.random.default_rng(0),  # replaced by each step's own generator
        lo=lo,
        scale=hi - lo,
        ct=ct,
        mr=modality == "mr",
        vol=vol,
        px=max(1.0, min(inplane) / 64.0),
        mask=None if mask is None else (np.asarray(mask) > 0),
    )
    for (kind, sev), step_seed in zip(steps, seed.spawn(len(steps))):
        # one child generator per step: a step's draws depend neither on the other steps nor
        # on the severities
        if sev == 0:
            continue
        ctx.rng = np.random.default_rng(step_seed)
        u = _FUNCS[kind](u, sev, ctx)
    if not channels:
        u = u[..., 0]
    out = lo + u * (hi - lo)
    if clip:
        out = np.clip(out, lo, hi)
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(img.dtype, copy=False)


def simulate_scanner(
    images,
    kind,
    severity: int = 3,
    *,
    modality: str | None = None,
    masks=None,
    value_range=None,
    spatial_dims: int | None = None,
    random_state=None,
):
    """Apply a simulated scanner shift (or several) to images.

    Parameters
    ----------
    images : ndarray, sequence of ndarrays or image frame
        ``(n, H, W)`` images, ``(n, H, W, C)`` channel-last colour images, ``(n, D, H, W)``
        volumes, a list of such images (sizes may differ), or an image frame
        (:func:`skrtl.make_image_frame`). Any numeric dtype; the output has the same
        container, shape and dtype.
    kind : str, list or ScannerProfile
        A shift name (``"blur"``, ``"sharpen"``, ``"gaussian_noise"``, ``"poisson_noise"``,
        ``"ct_low_dose"``, ``"gamma"``, ``"contrast"``, ``"brightness"``, ``"window"``,
        ``"lut"``, ``"downsample"``, ``"thick_slices"``, ``"ring"``, ``"streak"``,
        ``"speckle"``, ``"bias_field"``), a built-in profile name (``"ct_low_dose_soft_kernel"``,
        ``"mr_low_field"``, ...), a list of shift names or ``(name, severity)`` pairs applied in
        order, or a :class:`ScannerProfile`. :func:`list_scanner_shifts` describes them all.
    severity : int, default=3
        1 (mild) to 5 (severe); 0 returns an unchanged copy. Steps of a profile or list with
        their own severity keep it.
    modality : {"ct", "mr", "us", "xray"} or None, default=None
        The images' modality. ``"ct"`` means Hounsfield units: the value range is
        ``(-1024, 3071)`` and amounts are in HU. ``"mr"`` makes Gaussian noise Rician. A shift
        that is not realistic for the modality (e.g. ``"speckle"`` on CT) raises; ``None``
        allows every shift, with amounts relative to the value range. Defaults to the
        profile's modality for a :class:`ScannerProfile` or profile name.
    masks : array-like or sequence of ndarrays, optional
        Lesion masks, one per image (an image frame's ``mask`` column is used by default).
        Streak artefacts start from a random pixel of the mask, so that they cross the lesion.
        Masks are never changed: every shift keeps the image geometry.
    value_range : (float, float), optional
        Intensity range ``(low, high)`` that amounts refer to and the output is clipped to.
        Default: ``(0, 255)`` for ``uint8``, ``(-1024, 3071)`` with ``modality="ct"``, else each
        image's own minimum and maximum (not clipped).
    spatial_dims : {2, 3} or None, default=None
        Whether the images are 2-D (a 4-D array is then ``(n, H, W, C)``) or volumes. ``None``
        infers it: 3-D arrays are 2-D images; 4-D arrays are volumes unless their last axis
        has 1, 3 or 4 entries (colour channels); 3-D images of a frame are volumes when their
        mask is 3-D or their spacing has three values.
    random_state : int, numpy Generator or RandomState, or None, default=None
        Seeds the noise and artefacts. Image ``i`` is corrupted with a generator derived from
        ``random_state`` and ``i`` only; the global numpy generator is never used.

    Returns
    -------
    ndarray, list or pandas.DataFrame
        The corrupted images in the container of ``images`` (a frame keeps all its other
        columns, including masks and site).

    Raises
    ------
    ValueError
        For an unknown ``kind``, a severity outside 0..5, a shift unrealistic for
        ``modality``, ``"thick_slices"`` on 2-D images, or non-finite images.

    See Also
    --------
    list_scanner_shifts : names, modalities, parameters and descriptions.
    plot_scanner_shifts : one image under every shift and severity.

    Examples
    --------
    >>> import numpy as np
    >>> from skrtl.datasets import simulate_scanner
    >>> images = np.random.default_rng(0).integers(0, 256, (4, 32, 32)).astype(np.uint8)
    >>> shifted = simulate_scanner(images, "speckle", 4, modality="us", random_state=0)
    >>> shifted.shape, shifted.dtype
    ((4, 32, 32), dtype('uint8'))
    >>> noisy_soft = simulate_scanner(images, ["gaussian_noise", ("blur", 2)], random_state=0)
    """
    severity = _check_severity(severity)
    steps, profile_modality = _resolve_kind(kind, severity)
    if modality is None:
        modality = profile_modality
    _check_spatial_dims(spatial_dims)
    vrange = _check_value_range(value_range)
    seeds = _make_rng(random_state)

    frame = images if isinstance(images, pd.DataFrame) else None
    if frame is not None:
        if "image" not in frame.columns:
            raise ValueError(
                "simulate_scanner got a DataFrame without an 'image' column (columns: "
                f"{list(frame.columns)[:8]!r}); build it with skrtl.make_image_frame."
            )
        imgs = [np.asarray(im) for im in frame["image"].to_numpy()]
        if masks is None and "mask" in frame.columns:
            masks = list(frame["mask"].to_numpy())
        layouts = []
        for i, im in enumerate(imgs):
            if spatial_dims is not None:
                vol = spatial_dims == 3
                layouts.append((vol, im.ndim == (4 if vol else 3)))
            else:
                vol = _frame_is_volume(frame, im, i)
                layouts.append((vol, im.ndim == 3 and not vol))
    elif isinstance(images, np.ndarray) and images.dtype != object:
        vol, channels = _array_layout(images, spatial_dims)
        imgs = [images[i] for i in range(images.shape[0])]
        layouts = [(vol, channels)] * len(imgs)
    elif isinstance(images, np.ndarray | Sequence) and not isinstance(images, str):
        imgs = [np.asarray(im) for im in images]
        layouts = []
        for im in imgs:
            if im.ndim == 2:
                layouts.append((False, False))
            elif im.ndim in (3, 4):
                vol, channels = _array_layout(im[None], spatial_dims)
                layouts.append((vol, channels))
            else:
                raise ValueError(f"each image must be 2-D or 3-D, got shape {im.shape!r}.")
    else:
        raise TypeError(
            "images must be an array (n, H, W) / (n, D, H, W), a sequence of arrays or an image "
            f"frame, got {type(images).__name__}."
        )
    n = len(imgs)
    if n == 0:
        raise ValueError("images is empty: pass at least one image.")
    if masks is not None:
        masks = list(masks) if not isinstance(masks, np.ndarray) else list(masks)
        if len(masks) != n:
            raise ValueError(f"masks has {len(masks)} entries but there are {n} images.")
    for vol, _ in set(layouts):
        _check_modality(steps, modality, vol)

    children = seeds.spawn(n)
    out = []
    for i, (im, (vol, channels)) in enumerate(zip(imgs, layouts)):
        m = None
        if masks is not None:
            m = masks[i]
            if m is None or (isinstance(m, float) and np.isnan(m)):
                m = None
            else:
                m = np.asarray(m)
                spatial = im.shape[:-1] if channels else im.shape
                if m.shape != spatial:
                    raise ValueError(
                        f"mask {i} has shape {m.shape!r} but image {i} has spatial shape "
                        f"{spatial!r}."
                    )
        out.append(
            _corrupt_one(
                im,
                steps,
                vol=vol,
                channels=channels,
                modality=modality,
                mask=m,
                value_range=vrange,
                seed=children[i],
            )
        )
    if frame is not None:
        res = frame.copy()
        col = np.empty(n, dtype=object)
        for i, im in enumerate(out):
            col[i] = im
        res["image"] = col
        return res
    if isinstance(images, np.ndarray) and images.dtype != object:
        return np.stack(out).astype(images.dtype, copy=False)
    return out


def plot_scanner_shifts(
    image,
    kinds=None,
    *,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    modality: str | None = None,
    mask=None,
    value_range=None,
    random_state=0,
    display_range=None,
    panel_size: float = 1.3,
):
    """Show one image under every shift (rows) and severity (columns).

    Each panel is titled with its PSNR (dB) against the clean image, drawn with the clean
    image's grey-level window, so that intensity shifts stay visible.

    Parameters
    ----------
    image : ndarray of shape (H, W) or (D, H, W)
        One image; for a volume the middle slice is shown (shifts act on the whole volume).
    kinds : list of str, optional
        Shift or profile names; default every shift realistic for ``modality`` (every shift
        when ``modality`` is None; ``"thick_slices"`` only for volumes).
    severities : sequence of int, default=(1, 2, 3, 4, 5)
    modality, mask, value_range, random_state
        As in :func:`simulate_scanner`.
    display_range : (float, float), optional
        Grey-level window of every panel, e.g. ``(-250, 350)`` HU for soft tissue; default
        the 0.5 and 99.5 percentiles of the clean image.
    panel_size : float, default=1.3
        Size of one panel in inches.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    img = np.asarray(image)
    if img.ndim not in (2, 3):
        raise ValueError(
            f"image must be one 2-D image (H, W) or volume (D, H, W), got shape {img.shape!r}."
        )
    vol = img.ndim == 3
    if kinds is None:
        kinds = [
            s.name
            for s in _SHIFTS.values()
            if (modality is None or modality in s.modalities) and (vol or not s.volumes_only)
        ]
    kinds = list(kinds)
    if not kinds:
        raise ValueError(f"no shift is realistic for modality={modality!r}; pass kinds=[...].")
    sevs = [_check_severity(s) for s in severities]
    kw = dict(
        modality=modality,
        masks=None if mask is None else np.asarray(mask)[None],
        value_range=value_range,
        spatial_dims=3 if vol else 2,
        random_state=random_state,
    )
    clean = img.astype(np.float64)
    lo, hi = _value_range(img, _check_value_range(value_range), modality == "ct")[:2]
    if modality == "ct" and value_range is None:
        lo, hi = float(clean.min()), float(clean.max())
    if display_range is not None:
        show_lo, show_hi = (float(v) for v in display_range)
    else:
        show_lo, show_hi = float(np.percentile(clean, 0.5)), float(np.percentile(clean, 99.5))
    if show_hi <= show_lo:
        show_lo, show_hi = lo, hi
    peak = hi - lo

    def view(a):
        return a[a.shape[0] // 2] if vol else a

    fig, axes = plt.subplots(
        len(kinds),
        len(sevs) + 1,
        figsize=(panel_size * (len(sevs) + 1), panel_size * len(kinds) + 0.3),
        squeeze=False,
    )
    for r, kind in enumerate(kinds):
        ax = axes[r, 0]
        ax.imshow(view(clean), cmap="gray", vmin=show_lo, vmax=show_hi)
        ax.set_ylabel(kind, fontsize=7, rotation=0, ha="right", va="center")
        if r == 0:
            ax.set_title("clean", fontsize=7)
        for c, sev in enumerate(sevs, start=1):
            shifted = simulate_scanner(img[None], kind, sev, **kw)[0].astype(np.float64)
            mse = float(np.mean((shifted - clean) ** 2))
            psnr = np.inf if mse == 0 else 10 * np.log10(peak**2 / mse)
            ax = axes[r, c]
            ax.imshow(view(shifted), cmap="gray", vmin=show_lo, vmax=show_hi)
            ax.set_title(f"s{sev}  {psnr:.1f} dB", fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.3)
    return fig
