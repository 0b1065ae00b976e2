"""Saliency maps over their images, as a scikit-learn style display (masks outlined)."""

from __future__ import annotations

from numbers import Integral

import numpy as np

__all__ = ["SaliencyDisplay"]


def _grey(image: np.ndarray) -> np.ndarray:
    """An image scaled to [0, 1] by its 1st and 99th percentiles, for display."""
    img = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(img, [1.0, 99.0])
    if hi <= lo:
        return np.zeros_like(img)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def _pick_views(views: list, max_views: int) -> list:
    """At most ``max_views`` views, evenly spaced (all three planes of a 2.5-D sample)."""
    if len(views) <= max_views:
        return list(views)
    idx = np.unique(np.linspace(0, len(views) - 1, max_views).round().astype(int))
    return [views[i] for i in idx]


class SaliencyDisplay:
    """Saliency maps drawn over their images, with the lesion masks outlined.

    Build it with :meth:`from_estimator` (which calls :func:`skrtl.explain`) or
    :meth:`from_maps`; :meth:`plot` draws one panel per plane: a 2-D image is one panel; a
    2.5-D sample its three orthogonal planes (or its centre slice); a 3-D sample (slice-wise)
    a few of its slices. Maps in [0, 1] (Grad-CAM, Score-CAM) use a sequential colour map;
    signed maps (class activation maps of probes, occlusion) a diverging one centred on 0
    (red: evidence for the target class, blue: against it).

    Parameters
    ----------
    maps : SaliencyMaps
        The result of :func:`skrtl.explain`.
    samples : list of int, optional
        Positions (in ``maps``) of the samples to draw; default all.

    Attributes
    ----------
    figure_ : matplotlib Figure
    axes_ : ndarray of matplotlib Axes
        One per panel (unused panels are hidden).
    overlays_ : list of matplotlib AxesImage
        The saliency layer of each drawn panel.
    """

    def __init__(self, *, maps, samples=None):
        self.maps = maps
        n = len(maps)
        if samples is None:
            samples = list(range(n))
        samples = [samples] if isinstance(samples, Integral) else list(samples)
        bad = [s for s in samples if not (isinstance(s, Integral) and 0 <= int(s) < n)]
        if bad or not samples:
            raise ValueError(
                f"samples must be positions 0..{n - 1} of the explained images, got {samples!r}."
            )
        self.samples = [int(s) for s in samples]

    @classmethod
    def from_maps(cls, maps, *, samples=None, **plot_kwargs) -> SaliencyDisplay:
        """Plot saliency maps computed by :func:`skrtl.explain`.

        Parameters
        ----------
        maps : SaliencyMaps
        samples : list of int, optional
            Samples to draw (positions in ``maps``).
        **plot_kwargs
            Passed to :meth:`plot`.

        Returns
        -------
        SaliencyDisplay
        """
        return cls(maps=maps, samples=samples).plot(**plot_kwargs)

    @classmethod
    def from_estimator(
        cls,
        estimator,
        X,
        *,
        method="auto",
        layer=None,
        target=None,
        samples=None,
        explain_params=None,
        **plot_kwargs,
    ) -> SaliencyDisplay:
        """Explain ``estimator`` on ``X`` (:func:`skrtl.explain`) and plot the maps.

        Parameters
        ----------
        estimator : estimator
            A fitted estimator that :func:`skrtl.explain` accepts.
        X : ndarray or image frame
            A handful of images.
        method, layer, target
            Passed to :func:`skrtl.explain`.
        samples : list of int, optional
            Samples to draw.
        explain_params : dict, optional
            Further arguments of :func:`skrtl.explain` (``tta``, ``sample_domain``, ...).
        **plot_kwargs
            Passed to :meth:`plot`.

        Returns
        -------
        SaliencyDisplay
        """
        from ._explain import explain

        maps = explain(
            estimator, X, method=method, layer=layer, target=target, **(explain_params or {})
        )
        return cls.from_maps(maps, samples=samples, **plot_kwargs)

    def plot(
        self,
        *,
        max_views: int = 3,
        ncols: int | None = None,
        alpha: float = 0.45,
        cmap: str | None = None,
        show_mask: bool = True,
        titles=None,
        panel_size: float = 2.0,
        figure=None,
    ) -> SaliencyDisplay:
        """Draw the maps.

        Parameters
        ----------
        max_views : int, default=3
            Planes drawn per sample (slices of a 3-D sample are chosen evenly).
        ncols : int, optional
            Panels per row when every sample has one plane (default: up to 4); otherwise one
            row per sample.
        alpha : float, default=0.45
            Opacity of the saliency layer.
        cmap : str, optional
            Colour map of the saliency (default ``"jet"``, or ``"RdBu_r"`` for signed maps).
        show_mask : bool, default=True
            Outline the mask (green).
        titles : list of str, optional
            One title per drawn sample (default: row label, target and score).
        panel_size : float, default=2.0
            Side of a panel in inches.
        figure : matplotlib Figure, optional
            Draw into this figure (cleared first).

        Returns
        -------
        self
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        maps = self.maps
        chosen = [_pick_views(maps.views[i], max_views) for i in self.samples]
        if titles is not None and len(titles) != len(self.samples):
            raise ValueError(f"titles needs {len(self.samples)} entries, got {len(titles)}.")
        single = all(len(v) == 1 for v in chosen)
        if single:
            n = len(self.samples)
            cols = int(ncols) if ncols else min(n, 4)
            rows = int(np.ceil(n / cols))
            slots = [[(k // cols, k % cols)] for k in range(n)]
        else:
            cols = max(len(v) for v in chosen)
            rows = len(self.samples)
            slots = [[(r, c) for c in range(len(v))] for r, v in enumerate(chosen)]
        if figure is None:
            figure = plt.figure(figsize=(panel_size * cols, panel_size * rows + 0.3))
        else:
            figure.clear()
        axes = np.atleast_2d(figure.subplots(rows, cols, squeeze=False))
        for ax in axes.ravel():
            ax.axis("off")
        cmap = cmap or ("RdBu_r" if maps.signed else "jet")
        overlays = []
        for k, (i, views, where) in enumerate(zip(self.samples, chosen, slots)):
            values = np.concatenate([np.ravel(v.saliency) for v in maps.views[i]])
            values = values[np.isfinite(values)]
            if maps.signed:
                vmax = float(np.abs(values).max(initial=0.0)) or 1.0
                vmin = -vmax
            else:
                vmin, vmax = 0.0, max(float(values.max(initial=0.0)), 1e-12)
            spacing = maps.spacing[i] if maps.spacing is not None else None
            for j, (view, (r, c)) in enumerate(zip(views, where)):
                ax = axes[r, c]
                aspect = _aspect(spacing, view.plane.axis)
                img = _grey(view.image)
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, aspect=aspect)
                overlays.append(
                    ax.imshow(
                        view.saliency, cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha, aspect=aspect
                    )
                )
                if show_mask and view.mask is not None and view.mask.any():
                    ax.contour(view.mask.astype(float), [0.5], colors="lime", linewidths=0.8)
                if titles is not None:
                    title = titles[k] if j == 0 else view.name
                else:
                    title = self._title(i, view) if j == 0 else view.name
                ax.set_title(title, fontsize=7)
        figure.suptitle(f"{maps.method} ({_layer_text(maps.layer)}): {maps.units}", fontsize=8)
        figure.tight_layout(h_pad=1.2, rect=(0, 0, 1, 0.97))
        self.figure_ = figure
        self.axes_ = axes
        self.overlays_ = overlays
        return self

    def _title(self, i: int, view) -> str:
        maps = self.maps
        lines = [str(maps.index[i]) + ("" if view.plane.axis is None else f" {view.name}")]
        what = "decision" if maps.method == "cam" else "p"
        target = maps.targets[i]
        lines.append(
            (f"target {target}, " if target is not None else "") + f"{what}={maps.scores[i]:.2f}"
        )
        return "\n".join(lines)


def _layer_text(layer) -> str:
    return "+".join(str(v) for v in layer) if isinstance(layer, list | tuple) else str(layer)


def _aspect(spacing, axis) -> float | str:
    """Display aspect (row / column pixel size) of a plane, from the sample's spacing."""
    if spacing is None:
        return "equal"
    sp = [float(v) for v in spacing]
    if axis is None:
        sp2 = sp[-2:] if len(sp) >= 2 else [1.0, 1.0]
    elif len(sp) == 3:
        sp2 = [s for a, s in enumerate(sp) if a != axis]
    else:
        return "equal"
    return sp2[0] / sp2[1] if sp2[1] > 0 else "equal"
