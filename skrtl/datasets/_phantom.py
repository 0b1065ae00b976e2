"""Multi-site lesion phantom with known ground truth (texture, margin, prevalence, survival)."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from scipy import fft as sfft
from sklearn.utils import Bunch, check_random_state

from .._imaging import make_image_frame
from .._survival import make_survival_target

__all__ = ["default_site_params", "make_lesion_phantom", "power_law_field"]

_SITE_KEYS = ("blur_sigma", "noise_sd", "intensity_offset", "intensity_scale", "spacing")

# Three distinct "scanners": sharp/low-noise, blurred/bright, noisy/dark with coarse pixels.
_DEFAULT_SITES = (
    {
        "blur_sigma": 0.4,
        "noise_sd": 0.05,
        "intensity_offset": 0.0,
        "intensity_scale": 1.0,
        "spacing": 0.7,
    },
    {
        "blur_sigma": 1.2,
        "noise_sd": 0.08,
        "intensity_offset": 0.25,
        "intensity_scale": 1.3,
        "spacing": 0.8,
    },
    {
        "blur_sigma": 0.8,
        "noise_sd": 0.2,
        "intensity_offset": -0.2,
        "intensity_scale": 0.8,
        "spacing": 1.0,
    },
)


def _site_name(k: int) -> str:
    return chr(ord("A") + k) if k < 26 else f"S{k}"


def default_site_params(n_sites: int = 3) -> list[dict]:
    """Scanner parameters of the default simulated sites.

    The first three sites are fixed (sharp / blurred and bright / noisy and dark); further
    sites are drawn from a fixed generator, so they do not depend on ``random_state``.

    Parameters
    ----------
    n_sites : int, default=3

    Returns
    -------
    list of dict
        One dict per site with keys ``blur_sigma`` (Gaussian blur, pixels), ``noise_sd``
        (additive Gaussian noise, in units of the lesion contrast), ``intensity_offset``,
        ``intensity_scale`` (linear intensity map) and ``spacing`` (pixel size, mm).
    """
    out = [dict(p) for p in _DEFAULT_SITES[:n_sites]]
    for k in range(len(out), n_sites):
        rng = np.random.default_rng(1000 + k)
        out.append(
            {
                "blur_sigma": float(rng.uniform(0.3, 1.5)),
                "noise_sd": float(rng.uniform(0.03, 0.25)),
                "intensity_offset": float(rng.uniform(-0.3, 0.3)),
                "intensity_scale": float(rng.uniform(0.7, 1.4)),
                "spacing": float(rng.uniform(0.6, 1.2)),
            }
        )
    return out


def _check_site_params(site_params, n_sites: int) -> list[dict]:
    if site_params is None:
        return default_site_params(n_sites)
    if isinstance(site_params, dict) or len(site_params) != n_sites:
        raise ValueError(
            f"site_params must be a list of {n_sites} dicts (one per site, n_sites={n_sites}), "
            f"got {site_params!r}."
        )
    defaults = default_site_params(n_sites)
    out = []
    for k, (p, d) in enumerate(zip(site_params, defaults)):
        if not isinstance(p, dict):
            raise TypeError(f"site_params[{k}] must be a dict, got {type(p).__name__}.")
        unknown = set(p) - set(_SITE_KEYS)
        if unknown:
            raise ValueError(
                f"site_params[{k}] has unknown keys {sorted(unknown)!r}; allowed keys are "
                f"{list(_SITE_KEYS)!r}."
            )
        q = {**d, **p}
        for key in ("blur_sigma", "noise_sd", "intensity_scale"):
            if not (isinstance(q[key], Real) and q[key] >= 0):
                raise ValueError(f"site_params[{k}][{key!r}]={q[key]!r} must be a number >= 0.")
        if not (isinstance(q["spacing"], Real) and q["spacing"] > 0):
            raise ValueError(f"site_params[{k}]['spacing']={q['spacing']!r} must be > 0 (mm).")
        out.append({key: float(q[key]) for key in _SITE_KEYS})
    return out


def _freq_radius(shape: tuple[int, ...]) -> np.ndarray:
    """|f| (cycles / pixel) on the rfftn grid of ``shape``."""
    axes = [np.fft.fftfreq(s) for s in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    return np.sqrt(sum(g**2 for g in grids)).astype(np.float32)


def _spectral_filter(noise: np.ndarray, alpha: np.ndarray, fr: np.ndarray) -> np.ndarray:
    """Colour white noise (n, *shape) so that its power spectrum is |f|^-alpha (per sample)."""
    ndim = fr.ndim
    shape = noise.shape[1:]
    axes = tuple(range(1, ndim + 1))
    spec = sfft.rfftn(noise, axes=axes, workers=-1)
    logf = np.log(np.where(fr > 0, fr, 1.0))
    a = np.asarray(alpha, dtype=np.float32).reshape((-1,) + (1,) * ndim)
    amp = np.exp(-0.5 * a * logf[None])
    amp[(slice(None),) + (0,) * ndim] = 0.0  # zero mean
    field = sfft.irfftn(spec * amp, s=shape, axes=axes, workers=-1).astype(np.float32)
    flat = field.reshape(field.shape[0], -1)
    std = flat.std(axis=1)
    std[std == 0] = 1.0
    return field / std.reshape((-1,) + (1,) * ndim)


def power_law_field(shape, alpha, *, n: int = 1, random_state=None) -> np.ndarray:
    """Gaussian random fields with power spectrum ``S(f) ~ |f|^-alpha``.

    Parameters
    ----------
    shape : tuple of int
        Spatial shape (2-D or 3-D).
    alpha : float or array-like of shape (n,)
        Spectral exponent; larger is smoother (2: fractal clutter, 3-4: smooth blobs).
    n : int, default=1
        Number of fields.
    random_state : int, Generator or None

    Returns
    -------
    ndarray of shape (n, *shape), float32
        Zero-mean, unit-variance fields.
    """
    rng = np.random.default_rng(random_state)
    shape = tuple(int(s) for s in shape)
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float32), (n,))
    noise = rng.standard_normal((n,) + shape, dtype=np.float32)
    return _spectral_filter(noise, alpha, _freq_radius(shape))


def _gaussian_blur(x: np.ndarray, sigma: np.ndarray, fr: np.ndarray) -> np.ndarray:
    ndim = fr.ndim
    axes = tuple(range(1, ndim + 1))
    s = np.asarray(sigma, dtype=np.float32).reshape((-1,) + (1,) * ndim)
    if not np.any(s > 0):
        return x
    kernel = np.exp(-2.0 * np.pi**2 * s**2 * (fr**2)[None])
    return sfft.irfftn(
        sfft.rfftn(x, axes=axes, workers=-1) * kernel, s=x.shape[1:], axes=axes, workers=-1
    ).astype(np.float32)


def _pair(value, name: str) -> tuple[float, float]:
    if isinstance(value, Real):
        return float(value), float(value)
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be a number or a (benign, malignant) pair, got {value!r}."
        ) from None
    if a < 0 or b < 0:
        raise ValueError(f"{name}={value!r} must be >= 0.")
    return a, b


def make_lesion_phantom(
    n_samples: int = 300,
    *,
    ndim: int = 2,
    image_size: int = 64,
    n_sites: int = 3,
    site_params=None,
    prevalence=0.4,
    alpha_benign: float = 3.2,
    alpha_malignant: float = 2.2,
    heterogeneity=(0.3, 0.5),
    margin_irregularity=(0.1, 0.25),
    lesion_radius_mm: float = 12.0,
    risk_effect: float = 1.0,
    censoring_rate: float = 0.3,
    random_state=None,
) -> Bunch:
    """Simulated multi-site lesion images with masks, class labels and survival.

    Each patient has one lesion on a textured background. Its texture is a Gaussian random
    field with power spectrum ``S(f) ~ |f|^-alpha``: benign lesions are smoother
    (``alpha_benign``), malignant ones rougher (``alpha_malignant``), more heterogeneous
    (larger texture amplitude) and have more irregular margins. A latent standard-normal
    factor ``z`` scales lesion size and heterogeneity; the latent risk
    ``risk = risk_effect * (y + 0.8 * z)`` drives exponential survival times (with random
    censoring). Each site is a simulated scanner (Gaussian blur, noise, linear intensity map,
    pixel spacing) with its own prevalence, so covariate shift (scanner), label shift
    (prevalence) and the true signal are all known.

    Parameters
    ----------
    n_samples : int, default=300
        Number of patients, split evenly across sites (rows shuffled).
    ndim : {2, 3}, default=2
        2-D images ``(image_size, image_size)`` or 3-D volumes ``(image_size,) * 3``.
    image_size : int, default=64
        Side length in pixels (>= 16).
    n_sites : int, default=3
        Number of simulated sites, named ``"A"``, ``"B"``, ...
    site_params : list of dict, optional
        Per-site scanner parameters overriding :func:`default_site_params` (keys
        ``blur_sigma``, ``noise_sd``, ``intensity_offset``, ``intensity_scale``, ``spacing``).
    prevalence : float or sequence of float, default=0.4
        Probability of a malignant lesion, overall or per site.
    alpha_benign, alpha_malignant : float, default=3.2, 2.2
        Spectral exponents of the lesion texture.
    heterogeneity : float or (float, float), default=(0.3, 0.5)
        Texture amplitude inside the lesion (benign, malignant), relative to the contrast.
    margin_irregularity : float or (float, float), default=(0.1, 0.25)
        Relative amplitude of the radius perturbation (benign, malignant).
    lesion_radius_mm : float, default=12.0
        Mean lesion radius in mm (in pixels it depends on the site's spacing).
    risk_effect : float, default=1.0
        Log hazard ratio scale of the latent risk.
    censoring_rate : float in [0, 1), default=0.3
        Approximate fraction of censored patients.
    random_state : int, RandomState instance or None

    Returns
    -------
    sklearn.utils.Bunch
        ``frame``: image frame (columns ``image``, ``mask``, ``spacing``, ``site``);
        ``target``: 0 (benign) / 1 (malignant); ``survival``: structured ``(event, time)``
        array (months); ``risk``: latent log-hazard; ``sites``: site of each row;
        ``alpha``: texture exponent of each lesion; ``site_params``: dict site -> scanner
        parameters; ``prevalence``: dict site -> prevalence; ``description``.

    Examples
    --------
    >>> from skrtl.datasets import make_lesion_phantom
    >>> data = make_lesion_phantom(30, image_size=32, random_state=0)
    >>> data.frame.shape, data.target.shape, sorted(set(data.sites))
    ((30, 4), (30,), ['A', 'B', 'C'])
    """
    if not (isinstance(n_samples, Integral) and n_samples >= 1):
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}.")
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}.")
    if not (isinstance(image_size, Integral) and image_size >= 16):
        raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}.")
    if not (isinstance(n_sites, Integral) and 1 <= n_sites <= n_samples):
        raise ValueError(
            f"n_sites must be an integer in [1, n_samples={n_samples}], got {n_sites!r}."
        )
    if not (isinstance(censoring_rate, Real) and 0 <= censoring_rate < 1):
        raise ValueError(f"censoring_rate must be in [0, 1), got {censoring_rate!r}.")
    if not (isinstance(lesion_radius_mm, Real) and lesion_radius_mm > 0):
        raise ValueError(f"lesion_radius_mm must be > 0, got {lesion_radius_mm!r}.")
    params = _check_site_params(site_params, n_sites)
    if np.ndim(prevalence) > 0 and np.shape(prevalence) != (n_sites,):
        raise ValueError(
            f"prevalence must be a float or have one value per site ({n_sites}), "
            f"got {prevalence!r}."
        )
    prev = np.broadcast_to(np.asarray(prevalence, dtype=float), (n_sites,)).copy()
    if np.any((prev < 0) | (prev > 1)):
        raise ValueError(f"prevalence values must be in [0, 1], got {prevalence!r}.")
    het = _pair(heterogeneity, "heterogeneity")
    marg = _pair(margin_irregularity, "margin_irregularity")

    rs = check_random_state(random_state)
    rng = np.random.default_rng(rs.randint(2**31 - 1))
    n = int(n_samples)
    site_idx = rng.permutation(np.arange(n) % n_sites)
    y = (rng.random(n) < prev[site_idx]).astype(np.int64)
    z = rng.standard_normal(n)
    alpha = np.where(y == 1, alpha_malignant, alpha_benign) + 0.1 * rng.standard_normal(n)
    het_i = np.where(y == 1, het[1], het[0]) * np.exp(0.25 * z)
    marg_i = np.where(y == 1, marg[1], marg[0])
    spacing = np.array([params[s]["spacing"] for s in site_idx])
    radius_px = lesion_radius_mm * np.exp(0.15 * z) / spacing
    radius_px = np.clip(radius_px, 2.5, 0.35 * image_size)
    contrast = 1.0 + 0.1 * rng.standard_normal(n)
    centre_shift = rng.uniform(-0.08, 0.08, size=(n, ndim)) * image_size

    shape = (int(image_size),) * ndim
    fr = _freq_radius(shape)
    coords = np.meshgrid(
        *[np.arange(s, dtype=np.float32) - (s - 1) / 2.0 for s in shape], indexing="ij"
    )
    blur = np.array([params[s]["blur_sigma"] for s in site_idx], dtype=np.float32)
    noise_sd = np.array([params[s]["noise_sd"] for s in site_idx], dtype=np.float32)
    offset = np.array([params[s]["intensity_offset"] for s in site_idx], dtype=np.float32)
    scale = np.array([params[s]["intensity_scale"] for s in site_idx], dtype=np.float32)

    images = np.empty((n,) + shape, dtype=np.float32)
    masks = np.empty((n,) + shape, dtype=bool)
    chunk = max(1, int(2_000_000 // np.prod(shape)))
    ex = (slice(None),) + (None,) * ndim
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        m = sl.stop - sl.start
        white = rng.standard_normal((3, m) + shape, dtype=np.float32)
        texture = _spectral_filter(white[0], alpha[sl], fr)
        margin_field = _spectral_filter(white[1], np.full(m, 4.5), fr)
        background = _spectral_filter(white[2], np.full(m, 2.8), fr)
        d2 = np.zeros((m,) + shape, dtype=np.float32)
        for ax in range(ndim):
            d2 += (coords[ax][None] - centre_shift[sl, ax].astype(np.float32)[ex]) ** 2
        dist = np.sqrt(d2) / radius_px[sl].astype(np.float32)[ex]
        boundary = np.maximum(1.0 + marg_i[sl].astype(np.float32)[ex] * margin_field, 0.3)
        inside = dist < boundary
        # the centre pixel is always inside, so no mask is empty
        soft = 1.0 / (1.0 + np.exp(np.clip((dist - boundary) / 0.06, -50, 50)))
        lesion = contrast[sl].astype(np.float32)[ex] + het_i[sl].astype(np.float32)[ex] * texture
        signal = 0.15 * background + soft * lesion
        signal = _gaussian_blur(signal, blur[sl], fr)
        signal += noise_sd[sl][ex] * rng.standard_normal(signal.shape, dtype=np.float32)
        images[sl] = offset[sl][ex] + scale[sl][ex] * signal
        masks[sl] = inside

    risk = risk_effect * (y + 0.8 * z)
    base_hazard = 1.0 / 24.0  # median survival ~ 17 months at risk 0
    t_event = rng.exponential(1.0 / (base_hazard * np.exp(risk)))
    if censoring_rate > 0:
        # exponential censoring with a rate giving roughly the requested censored fraction
        c_rate = censoring_rate / (1 - censoring_rate) * base_hazard * np.exp(risk).mean()
        t_cens = rng.exponential(1.0 / c_rate, size=n)
    else:
        t_cens = np.full(n, np.inf)
    event = t_event <= t_cens
    time = np.minimum(t_event, t_cens)

    names = np.array([_site_name(k) for k in range(n_sites)], dtype=object)
    sites = names[site_idx]
    sp = np.repeat(spacing[:, None], ndim, axis=1)
    frame = make_image_frame(images, masks=masks, spacing=sp, sites=sites)
    description = (
        f"Lesion phantom: {n} {ndim}-D images of {image_size} px from {n_sites} simulated "
        f"sites; texture S(f)~|f|^-alpha with alpha {alpha_benign} (benign) vs "
        f"{alpha_malignant} (malignant); prevalence per site "
        f"{dict(zip(names.tolist(), prev.round(3).tolist()))}."
    )
    return Bunch(
        frame=frame,
        target=y,
        survival=make_survival_target(event, time),
        risk=risk,
        sites=sites,
        alpha=alpha,
        site_params={names[k]: params[k] for k in range(n_sites)},
        prevalence={names[k]: float(prev[k]) for k in range(n_sites)},
        description=description,
    )
