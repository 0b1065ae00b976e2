"""Self-contained HTML pages: tables, text and figures embedded as data URIs.

A report written with these helpers is one file that opens anywhere (mail, a shared drive, a
browser without network): every image is embedded as a base64 ``data:`` URI, the style sheet
is inline, and the page loads nothing else (not even a favicon).
"""

from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["data_uri", "html_figure", "html_page", "html_table", "html_text"]

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 0 auto; max-width: 1100px; padding: 1.5em 2em 3em; color: #1d2330;
       line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #d6dbe4;
     padding-bottom: 0.2em; }
nav ul { columns: 2; padding-left: 1.2em; font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.86em; }
th, td { border: 1px solid #d6dbe4; padding: 0.25em 0.6em; text-align: left; }
th { background: #eef1f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #f8f9fb; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e6ec; }
figcaption { font-size: 0.85em; color: #4a5263; }
.meta { color: #4a5263; font-size: 0.92em; }
.notes li { font-size: 0.88em; }
"""


def data_uri(path: str | os.PathLike) -> str:
    """The file as a ``data:`` URI (base64), for an ``<img src>`` that needs no other file."""
    path = Path(path)
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"{path.name}: only {sorted(_MIME)} images can be embedded.")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _cell(value, float_format: str) -> tuple[str, bool]:
    if isinstance(value, bool | np.bool_):
        return str(bool(value)), False
    if isinstance(value, int | np.integer):
        return str(int(value)), True
    if isinstance(value, float | np.floating):
        if math.isnan(float(value)):
            return "", True
        return float_format.format(float(value)), True
    return html.escape("" if value is None else str(value)), False


def html_table(df: pd.DataFrame, *, float_format: str = "{:.3f}", index: bool = False) -> str:
    """A ``<table>`` of a DataFrame (escaped text, right-aligned numbers, NaN left empty)."""
    if index:
        df = df.reset_index()
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for row in df.itertuples(index=False):
        cells = []
        for value in row:
            text, numeric = _cell(value, float_format)
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def html_text(text: str) -> str:
    """Paragraphs (one per non-empty line), escaped."""
    return "".join(f"<p>{html.escape(line)}</p>" for line in text.splitlines() if line.strip())


def html_figure(path: str | os.PathLike, caption: str) -> str:
    """A ``<figure>`` with the image embedded and its caption."""
    alt = html.escape(caption, quote=True)
    return (
        f'<figure><img src="{data_uri(path)}" alt="{alt}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def html_page(title: str, sections: list[tuple[str, str, str]], *, intro: str = "") -> str:
    """A whole page: ``sections`` are ``(anchor, heading, body html)``, with a contents list."""
    toc = "".join(
        f'<li><a href="#{html.escape(a, quote=True)}">{html.escape(h)}</a></li>'
        for a, h, _ in sections
    )
    body = "".join(
        f'<section id="{html.escape(a, quote=True)}"><h2>{html.escape(h)}</h2>{content}</section>'
        for a, h, content in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{intro}"
        f"<nav><ul>{toc}</ul></nav>{body}</body></html>\n"
    )
