"""`imgindex report OUT` / `python -m jobs.report`: OUT/report/index.html, one page to judge the clusters by eye.

The page is self-contained: inline CSS, no script, no network; its thumbnails and the 2-D map are files next to it in
OUT/report/. Large collections are sampled (the page says so), so the page stays small and quick to write.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps

from cluster.index import prepare
from embedder.collection import shard_names
from embedder.outdir import CLUSTERS_FILE, DUPLICATES_FILE, ERRORS, K_SWEEP_FILE, OUTLIERS_FILE, REPORT_DIR, OutDir, open_out
from embedder.reader import read_bytes
from embedder.writer import read_shard
from jobs.arguments import log_into

log = logging.getLogger("imgindex")

WEB_DIR = os.path.join(os.path.dirname(__file__), "web")
THUMB_PIXELS = 160


@dataclass(frozen=True)
class ReportLimits:
    """How much of a large collection the page shows; everything beyond is sampled or cut, and the page says so."""

    nearest: int = 8  # images nearest each centroid
    outliers: int = 4  # farthest images of each cluster
    sections: int = 100  # clusters with a section of thumbnails (the largest ones)
    map_points: int = 5000  # images drawn on the 2-D map (a seeded random sample)
    errors: int = 1000  # failed files listed
    duplicate_groups: int = 20  # near-duplicate groups shown (the largest ones)
    group_images: int = 12  # images shown per near-duplicate group, keeper first
    top_outliers: int = 24  # images least like any other (outliers.csv's first rows)


def thumbnail_jpeg(path: str, pixels: int = THUMB_PIXELS) -> bytes:
    """A JPEG thumbnail (longest side `pixels`, EXIF orientation applied) of the image at a local path or URI.

    Raises OSError or ValueError (missing file, undecodable, or over Pillow's decompression-bomb limit).
    """
    data = read_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as img:
            # JPEG only: decode at a reduced scale, several times faster than a full decode for a small thumbnail.
            img.draft("RGB", (pixels * 2, pixels * 2))
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((pixels, pixels), Image.Resampling.BILINEAR)
            buffer = io.BytesIO()
            img.save(buffer, "JPEG", quality=80)
    except (Image.DecompressionBombError, SyntaxError, EOFError) as e:
        raise ValueError(str(e)) from None
    return buffer.getvalue()


def _sample_vectors(folder: OutDir, ids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The vectors (as the index compares them) of the images `ids`, shard by shard, with their ids."""
    wanted = pa.array(ids, type=pa.int64())
    found_ids, found = [], []
    for name in shard_names(folder):
        table = read_shard(folder, name, ["id", "embedding"])
        table = table.filter(pc.is_in(table.column("id"), value_set=wanted))
        if table.num_rows:
            emb = table.column("embedding").combine_chunks()
            found.append(emb.values.to_numpy(zero_copy_only=False).reshape(-1, emb.type.list_size))
            found_ids.append(table.column("id").to_numpy())
    if not found:
        return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32)
    return np.concatenate(found_ids), prepare(np.concatenate(found), metric)


def _draw_map(ids: np.ndarray, xb: np.ndarray, cluster_of: pd.Series) -> bytes:
    """A PNG scatter of the first two principal components of `xb`, one colour per cluster."""
    import matplotlib
    import torch

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patheffects import withStroke

    # Randomized PCA: two components of a 4096-d sample in a second, where a full eigendecomposition takes minutes.
    torch.manual_seed(0)
    _, _, v = torch.pca_lowrank(torch.from_numpy(xb), q=2, center=True, niter=4)
    xy = (xb - xb.mean(axis=0)) @ v.numpy()
    labels = cluster_of.reindex(ids).to_numpy()
    figure, axes = plt.subplots(figsize=(8, 6), dpi=100)
    # tab20's dark shades first, then the light ones: neighbouring cluster numbers get distinct hues.
    palette = plt.get_cmap("tab20")([*range(0, 20, 2), *range(1, 20, 2)])
    colours = palette[labels % 20]
    axes.scatter(xy[:, 0], xy[:, 1], c=colours, s=6 if len(xy) > 1000 else 24, alpha=0.8, linewidths=0)
    clusters = np.unique(labels)
    if len(clusters) <= 40:
        for c in clusters:
            axes.annotate(str(c), xy[labels == c].mean(axis=0), xytext=(5, 5), textcoords="offset points", fontsize=9,
                          weight="bold", color=palette[c % 20], path_effects=[withStroke(linewidth=2, foreground="white")])
    axes.set_xlabel("principal component 1")
    axes.set_ylabel("principal component 2")
    axes.set_title(f"{len(xy):,} images, coloured by cluster")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _write_thumbnails(folder: OutDir, images: pd.DataFrame) -> set[int]:
    """Thumbnails of `images` (id, path) into OUT/report/thumbs/ID.jpg, removing the others; returns the ids that got
    one."""

    def one(row: tuple[int, str]) -> int | None:
        key, path = row
        try:
            folder.write_bytes(f"{REPORT_DIR}/thumbs/{key}.jpg", thumbnail_jpeg(path))
            return key
        except (OSError, ValueError) as e:
            log.warning("report: no thumbnail for %s: %s", path, e)
            return None

    rows = list(zip(images["id"].tolist(), images["path"].tolist()))
    # Pillow releases the GIL while it decodes, so threads use every core.
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        made = {key for key in pool.map(one, rows) if key is not None}
    for name in folder.list(f"{REPORT_DIR}/thumbs", ".jpg"):
        if int(os.path.basename(name)[: -len(".jpg")]) not in made:
            folder.delete(name)
    return made


def _facts(manifest: dict) -> list[tuple[str, str]]:
    """The collection's numbers as (label, value) rows: counts, model, weights, layer, metric, index, clusters."""
    counts = manifest.get("counts", {})
    weights = manifest.get("weights", {})
    precision = manifest.get("precision", {})
    rows = [
        ("images", f"{counts.get('images', 0):,}"),
        ("errors", f"{counts.get('errors', 0):,}"),
        ("listed inputs", f"{counts.get('listed', 0):,}"),
        ("model", f"{manifest.get('model', '')} {manifest.get('layer', '')} ({manifest.get('dimension', '')}-d)"),
        ("weights", f"{weights.get('name', '')} (sha256 {str(weights.get('sha256', ''))[:12]})"),
        ("metric", str(manifest.get("metric", ""))),
        ("precision", ", ".join(precision.get("used", [])) or str(precision.get("requested", ""))),
    ]
    if weights.get("note"):
        rows.append(("note", weights["note"]))
    # Whatever the index, k-means and duplicates steps record (type, recall, parameters) is shown as it is, one level deep.
    for section in ("index", "clusters", "duplicates"):
        for key, value in manifest.get(section, {}).items():
            inner = value.items() if isinstance(value, dict) else [(None, value)]
            for name, item in inner:
                if isinstance(item, (str, int, float, bool)) and key != "file":
                    rows.append((f"{section} {key}" + (f".{name}" if name else ""), _format(item)))
    rows.append(("updated", str(manifest.get("updated", ""))))
    return rows


def _format(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _cluster_sections(table: pd.DataFrame, manifest: dict, limits: ReportLimits,
                      notes: list[str]) -> tuple[list[tuple[int, int]], list[dict]]:
    """Every cluster's size, and the sections (nearest and farthest images) of the largest ones."""
    # clusters.csv is sorted by cluster, then distance to the centroid: head = nearest, tail = farthest.
    size = table.groupby("cluster").size()
    k = max(int(manifest.get("clusters", {}).get("k", 0)), int(size.index.max()) + 1)
    size = size.reindex(range(k), fill_value=0)
    shown = sorted(size[size > 0].sort_values(ascending=False, kind="stable").index[: limits.sections])
    if len(shown) < int((size > 0).sum()):
        notes.append(f"Sections show the {len(shown):,} largest of {k:,} clusters; the size table lists them all.")
    sections = []
    for c, rows in table[table["cluster"].isin(shown)].groupby("cluster", sort=True):
        nearest = rows.head(limits.nearest)
        outliers = rows.iloc[len(nearest):].tail(limits.outliers).iloc[::-1]
        sections.append({"cluster": int(c), "size": len(rows), "mean_distance": float(rows["distance"].mean()),
                         "nearest": _cards(nearest), "outliers": _cards(outliers)})
    return [(int(c), int(n)) for c, n in size.items()], sections


def _cards(frame: pd.DataFrame) -> list[dict]:
    """One card per row (id, path, distance and any keep/reason), its thumbnail flag set once thumbnails exist."""
    extra = [column for column in ("keep", "reason") if column in frame.columns]
    return [{"id": int(row["id"]), "path": row["path"], "distance": float(row["distance"]), "thumb": False}
            | {column: row[column] for column in extra} for row in frame.to_dict("records")]


def _duplicate_sections(groups: pd.DataFrame, limits: ReportLimits, notes: list[str]) -> list[dict]:
    """The largest near-duplicate groups, keeper first then by distance to it, at most `group_images` cards each."""
    sizes = groups.groupby("group").size().sort_values(ascending=False, kind="stable")
    shown = sizes.index[: limits.duplicate_groups]
    if len(shown) < len(sizes):
        notes.append(f"Near-duplicates shows the {len(shown):,} largest of {len(sizes):,} groups; duplicates.csv lists them all.")
    sections = []
    for group in shown:
        rows = groups[groups["group"] == group].sort_values(["keep", "distance"], ascending=[False, True], kind="stable")
        sections.append({"group": int(group), "size": int(sizes[group]), "cards": _cards(rows.head(limits.group_images))})
    return sections


def _write_map(folder: OutDir, table: pd.DataFrame, metric: str, points: int, seed: int, notes: list[str]) -> bool:
    """OUT/report/map.png from a seeded sample of at most `points` images; False when there is no map."""
    sample = table["id"].to_numpy()
    if len(sample) > points:
        sample = np.random.default_rng(seed).choice(sample, points, replace=False)
        notes.append(f"The map shows a random sample of {points:,} of the {len(table):,} images.")
    ids, xb = _sample_vectors(folder, sample, metric)
    if len(ids) < 3:
        return False
    try:
        folder.write_bytes(f"{REPORT_DIR}/map.png", _draw_map(ids, xb, table.set_index("id")["cluster"]))
    except ImportError:
        notes.append("No map: matplotlib is not installed (pip install 'imgindex[report]').")
        return False
    return True


def _sweep_table(sweep: pd.DataFrame | None, manifest: dict) -> dict | None:
    """OUT/k_sweep.csv as the template's table (whatever columns it has), the row of the chosen k marked."""
    if sweep is None or not len(sweep):
        return None
    chosen = manifest.get("clusters", {}).get("k")
    return {
        "columns": list(sweep.columns),
        "rows": [[_format(v) for v in row] for row in sweep.itertuples(index=False)],
        "chosen": (sweep["k"] == chosen).tolist() if "k" in sweep.columns else [False] * len(sweep),
    }


def report(out: str, limits: ReportLimits = ReportLimits(), seed: int = 0) -> str:
    """Write OUT/report/index.html (with thumbnails and map.png beside it) and return its location.

    Parameters
    ----------
    out
        A finished output folder (manifest.json; clusters.csv, errors.csv and k_sweep.csv are shown when present).
    limits
        How many images per cluster, cluster sections, map points and failed files the page shows.
    seed
        Seed of the map's random sample.

    Returns
    -------
    The location of the page (a local path, or the URI when OUT is one).
    """
    started = time.monotonic()
    folder = open_out(out)
    manifest = folder.read_manifest()
    table = folder.read_csv(CLUSTERS_FILE)
    errors = folder.read_csv(ERRORS)
    sweep = folder.read_csv(K_SWEEP_FILE)
    notes: list[str] = []

    sizes: list[tuple[int, int]] = []
    sections: list[dict] = []
    has_map = False
    if table is not None and len(table):
        sizes, sections = _cluster_sections(table, manifest, limits, notes)
        has_map = _write_map(folder, table, manifest["metric"], limits.map_points, seed, notes)
    else:
        notes.append("No clusters.csv yet: run `imgindex cluster OUT --clusters K` for the cluster sections and the map.")
    groups = folder.read_csv(DUPLICATES_FILE)
    duplicate_sections = None if groups is None else _duplicate_sections(groups, limits, notes)
    outlier_table = folder.read_csv(OUTLIERS_FILE, ["id", "path", "distance"])
    outliers = None if outlier_table is None else _cards(outlier_table.head(limits.top_outliers))
    cards = [card for s in sections for card in s["nearest"] + s["outliers"]]
    cards += [card for s in duplicate_sections or [] for card in s["cards"]] + (outliers or [])
    thumbs = _write_thumbnails(folder, pd.DataFrame({"id": [c["id"] for c in cards], "path": [c["path"] for c in cards]},
                                                    columns=["id", "path"]).drop_duplicates("id"))
    for card in cards:
        card["thumb"] = card["id"] in thumbs

    failed = [] if errors is None else list(zip(errors["path"].astype(str), errors["error"].astype(str)))
    if len(failed) > limits.errors:
        notes.append(f"The failed-files list shows the first {limits.errors:,} of {len(failed):,} (all are in errors.csv).")

    from jinja2 import Environment, FileSystemLoader

    env = Environment(loader=FileSystemLoader(WEB_DIR), autoescape=True)
    with open(os.path.join(WEB_DIR, "style.css"), encoding="utf-8") as f:
        css = f.read()
    page = env.get_template("report.html").render(
        css=css, title=os.path.basename(folder.location.rstrip("/")) or folder.location, location=folder.location,
        facts=_facts(manifest), notes=notes, sizes=sizes, sections=sections, has_map=has_map,
        failed=failed[: limits.errors], errors_total=len(failed), sweep=_sweep_table(sweep, manifest),
        duplicates=duplicate_sections, duplicates_record=manifest.get("duplicates"), outliers=outliers,
        created=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    folder.write_bytes(f"{REPORT_DIR}/index.html", page.encode("utf-8"))
    location = f"{folder.location.rstrip('/')}/{REPORT_DIR}/index.html"
    log.info("wrote %s (%.1f s)", location, time.monotonic() - started)
    return location


def main(args: argparse.Namespace) -> int:
    """`imgindex report` from its parsed command line."""
    log_into(args.out, args.verbose)
    report(args.out)
    return 0


if __name__ == "__main__":
    from jobs.arguments import command_entry

    command_entry("report", main)
