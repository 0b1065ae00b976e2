"""File input speed: reading CT volumes and masks, and lesion-centred crops on real sizes.

A synthetic CT of 512 x 512 x 200 voxels (spacing 2.0 x 0.75 x 0.75 mm, int16 HU with a body,
noise and a 30 mm lesion) and its two-label mask are written to a temporary folder as NIfTI
(``.nii.gz`` and ``.nii``), NRRD and a DICOM series of 200 files (SimpleITK), then:

* ``header``: :func:`skrtl.read_header` (geometry without pixels) per format;
* ``read``: :func:`skrtl.read_image` per format (float32, reoriented to LPS, HU);
* ``mask``: :func:`skrtl.read_mask` with the geometry check and ``label=1``;
* ``crop``: :func:`skrtl.crop_lesion` to a 64 mm box at 1 mm isotropic (linear and cubic
  B-spline), at 1 mm in-plane only, and a bounding box + 10 mm margin without resampling;
* ``naive``: what cropping first avoids -- resampling the whole volume to 1 mm
  (``scipy.ndimage.zoom``, linear) and cropping afterwards;
* ``loader``: peak resident memory (RSS) of a process that walks a cohort of ``N`` cases of
  256 x 256 x 64 voxels with :func:`skrtl.iter_cases` and crops each, for two values of ``N``
  (the rows cycle over 4 files on disk). Constant peak memory means the loader keeps nothing.

Timings are the median of ``--repeats`` runs, in seconds, on whatever CPU runs the script.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_io.py           # full run (~3 min, 2 cores)
    python benchmarks/bench_io.py --quick                     # smoke run: smaller volume
"""

from __future__ import annotations

import argparse
import json
import locale
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def phantom(shape, spacing, seed=0):
    """int16 CT-like volume (HU) and a uint8 mask: 1 = lesion (30 mm), 2 = a second organ."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(
        *[(np.arange(n) - n / 2) * s for n, s in zip(shape, spacing)], indexing="ij", sparse=True
    )
    z, y, x = grids
    body = (y / (0.45 * shape[1] * spacing[1])) ** 2 + (x / (0.48 * shape[2] * spacing[2])) ** 2
    vol = np.broadcast_to(np.where(body <= 1, 40, -1000), shape).astype(np.int16)
    vol += rng.normal(0, 20, size=shape).astype(np.int16)
    lesion = (z - 5) ** 2 + (y + 20) ** 2 + (x - 30) ** 2 <= 15.0**2
    organ = (z / 60) ** 2 + ((y - 40) / 50) ** 2 + ((x + 60) / 40) ** 2 <= 1
    vol[lesion] += 60
    mask = np.zeros(shape, np.uint8)
    mask[np.broadcast_to(organ & (body <= 1), shape)] = 2
    mask[lesion] = 1
    return vol, mask


def write_files(vol, mask, spacing, root: Path) -> dict:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(vol)
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    msk = sitk.GetImageFromArray(mask)
    msk.CopyInformation(img)
    out = {}
    for name, compress in (("ct.nii.gz", True), ("ct.nii", False), ("ct.nrrd", True)):
        sitk.WriteImage(img, str(root / name), useCompression=compress)
        out[name] = root / name
    sitk.WriteImage(msk, str(root / "mask.nii.gz"), useCompression=True)
    out["mask"] = root / "mask.nii.gz"
    series = root / "dicom"
    series.mkdir()
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer switches the C locale to "C"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.8.498.77"
    for k in range(vol.shape[0]):
        sl = sitk.GetImageFromArray(vol[k])
        sl.SetSpacing((float(spacing[2]), float(spacing[1])))
        for tag, val in {
            "0008|0060": "CT",
            "0008|0018": f"{uid}.{k + 1}",
            "0020|000e": uid,
            "0020|0013": str(k + 1),
            "0020|0032": f"0\\0\\{k * spacing[0]:.4f}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|1052": "-1024",
            "0028|1053": "1",
        }.items():
            sl.SetMetaData(tag, val)
        writer.SetFileName(str(series / f"im{k:04d}.dcm"))
        writer.Execute(sl)
    locale.setlocale(locale.LC_ALL, saved)
    out["dicom"] = series
    return out


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def naive_resample_then_crop(vol, mask, spacing, box_mm=64.0, target=1.0):
    """Resample the whole volume to ``target`` mm, then cut the box (what crop-first avoids)."""
    from scipy import ndimage

    zoom = [s / target for s in spacing]
    big = ndimage.zoom(vol.astype(np.float32), zoom, order=1, grid_mode=True, mode="nearest")
    c = np.round(np.argwhere(mask).mean(axis=0) * np.asarray(zoom)).astype(int)
    h = int(box_mm / target / 2)
    return big[tuple(slice(max(0, ci - h), ci + h) for ci in c)]


def _vm_hwm_mib() -> float:
    """Peak resident memory of this process image (VmHWM; unlike ru_maxrss, not inherited
    from the parent across fork + exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # pragma: no cover


def loader_child(n_cases: int, folder: str) -> None:
    """Walk a cohort of n_cases rows and crop each; print the peak RSS (MiB)."""
    import pandas as pd

    from skrtl import crop_lesion, iter_cases, read_cohort

    files = sorted(Path(folder).glob("case*_img.nii.gz"))
    rows = [
        {
            "image": str(files[i % len(files)]),
            "mask": str(files[i % len(files)]).replace("_img", "_mask"),
            "age": 50 + i % 30,
        }
        for i in range(n_cases)
    ]
    frame = read_cohort(pd.DataFrame(rows), label=1, validate="exists")
    baseline = _vm_hwm_mib()  # after the imports
    total = 0.0
    for case in iter_cases(frame):
        crop = crop_lesion(case.image, case.mask, size_mm=64, target_spacing=1.0)
        total += float(crop.image.mean())
    peak = _vm_hwm_mib()
    print(
        json.dumps(
            {
                "n_cases": n_cases,
                "peak_rss_mib": peak,
                "peak_before_loop_mib": baseline,
                "growth_mib": peak - baseline,
                "check": total,
            }
        )
    )


def loader_rss(sizes, shape, spacing, root: Path) -> dict:
    import SimpleITK as sitk

    for i in range(4):
        vol, mask = phantom(shape, spacing, seed=10 + i)
        img = sitk.GetImageFromArray(vol)
        img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
        sitk.WriteImage(img, str(root / f"case{i}_img.nii.gz"), useCompression=True)
        msk = sitk.GetImageFromArray(mask)
        msk.CopyInformation(img)
        sitk.WriteImage(msk, str(root / f"case{i}_mask.nii.gz"), useCompression=True)
    out = {}
    env = dict(
        os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    for n in sizes:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--loader-child", str(n), str(root)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["seconds"] = time.perf_counter() - t0
        out[str(n)] = res
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "io.json")
    ap.add_argument("--loader-child", nargs=2, metavar=("N", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.loader_child:
        loader_child(int(args.loader_child[0]), args.loader_child[1])
        return 0
    from skrtl import crop_lesion, read_header, read_image, read_mask

    if args.quick and args.out == RESULTS / "io.json":  # keep the full results
        args.out = RESULTS / "quick" / "io.json"
    shape = (48, 128, 128) if args.quick else (200, 512, 512)
    spacing = (2.0, 0.75, 0.75)
    repeats = 1 if args.quick else args.repeats
    loader_shape = (16, 64, 64) if args.quick else (64, 256, 256)
    loader_sizes = (10, 40) if args.quick else (50, 400)
    t_start = time.perf_counter()
    vol, mask = phantom(shape, spacing)
    result: dict = {
        "benchmark": "io",
        "quick": bool(args.quick),
        "volume": {"shape": list(shape), "spacing_mm": list(spacing), "dtype": "int16"},
        "lesion_voxels": int((mask == 1).sum()),
        "repeats": repeats,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        files = write_files(vol, mask, spacing, root)
        result["write_seconds"] = time.perf_counter() - t0
        result["file_mib"] = {
            k: (sum(f.stat().st_size for f in p.iterdir()) if p.is_dir() else p.stat().st_size)
            / 2**20
            for k, p in files.items()
        }
        headers, reads = {}, {}
        image = None
        for name in ("ct.nii.gz", "ct.nii", "ct.nrrd", "dicom"):
            headers[name], _ = timed(lambda p=files[name]: read_header(p), repeats)
            reads[name], image = timed(lambda p=files[name]: read_image(p), repeats)
            assert image.shape == shape and abs(image.array.mean() - vol.mean()) < 1e-3
            print(f"{name:10s} header {headers[name]:.4f} s   read {reads[name]:.3f} s")
        result["header_seconds"] = headers
        result["read_seconds"] = reads
        result["mask_seconds"], lesion = timed(
            lambda: read_mask(files["mask"], reference=image, label=1), repeats
        )
        print(f"mask (geometry check + label) {result['mask_seconds']:.3f} s")
        crops = {}
        variants = {
            "64mm_1mm_linear": {"size_mm": 64, "target_spacing": 1.0, "order": 1},
            "64mm_1mm_bspline": {"size_mm": 64, "target_spacing": 1.0, "order": 3},
            "64mm_1mm_in_plane": {"size_mm": 64, "target_spacing": (None, 1.0, 1.0)},
            "bbox_10mm_margin": {"margin_mm": 10.0},
        }
        for name, kw in variants.items():
            crops[name], crop = timed(lambda kw=kw: crop_lesion(image, lesion, **kw), repeats)
            print(f"crop {name:20s} {crops[name]:.4f} s  -> {crop.image.shape}")
        result["crop_seconds"] = crops
        if not args.quick:
            result["naive_resample_then_crop_seconds"], _ = timed(
                lambda: naive_resample_then_crop(image.array, lesion, spacing), 1
            )
            naive = result["naive_resample_then_crop_seconds"]
            print(f"naive whole-volume resample then crop {naive:.2f} s")
        loader_root = root / "loader"
        loader_root.mkdir()
        result["loader"] = {
            "case_shape": list(loader_shape),
            "per_size": loader_rss(loader_sizes, loader_shape, spacing, loader_root),
        }
        for n, res in result["loader"]["per_size"].items():
            rss, grow, sec = res["peak_rss_mib"], res["growth_mib"], res["seconds"]
            print(f"loader {n:>4s} cases: peak RSS {rss:.0f} MiB (+{grow:.0f}), {sec:.1f} s")
    full = reads["ct.nii.gz"] + result["mask_seconds"] + crops["64mm_1mm_linear"]
    sizes = [str(n) for n in loader_sizes]
    per = result["loader"]["per_size"]
    result["summary"] = {
        "read_nifti_gz_s": reads["ct.nii.gz"],
        "read_dicom_series_s": reads["dicom"],
        "crop_64mm_1mm_s": crops["64mm_1mm_linear"],
        "read_image_mask_and_crop_s": full,
        "naive_resample_then_crop_s": result.get("naive_resample_then_crop_seconds"),
        f"loader_peak_rss_mib_{sizes[0]}": per[sizes[0]]["peak_rss_mib"],
        f"loader_peak_rss_mib_{sizes[1]}": per[sizes[1]]["peak_rss_mib"],
        f"loader_rss_growth_mib_{sizes[0]}": per[sizes[0]]["growth_mib"],
        f"loader_rss_growth_mib_{sizes[1]}": per[sizes[1]]["growth_mib"],
    }
    result["seconds_total"] = time.perf_counter() - t_start
    result["hardware"] = (
        f"shared 2-core CPU ({platform.machine()}), OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; other jobs were running"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
