"""The HTML report: written by `imgindex run`, its content checked against clusters.csv and errors.csv."""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser

import pandas as pd
import pytest

from jobs.report import ReportLimits, report


class Page(HTMLParser):
    """What a test needs from the page: section ids, image sources, links, table cells, stylesheet/script tags."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.external: list[str] = []
        self.cells: list[str] = []
        self._cell = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id", ""))
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs.get("href", ""))
        if tag in ("script", "link") or re.match(r"^(https?:)?//", attrs.get("src", "") or attrs.get("href", "")):
            self.external.append(tag)
        self._cell = tag == "td"

    def handle_data(self, data):
        if self._cell:
            self.cells.append(data.strip())
            self._cell = False


def read_page(out: str) -> tuple[str, Page]:
    with open(os.path.join(out, "report", "index.html"), encoding="utf-8") as f:
        text = f.read()
    return text, Page(text)


def test_run_writes_a_report_with_clusters_images_and_failed_files(run_out):
    text, page = read_page(run_out)
    table = pd.read_csv(os.path.join(run_out, "clusters.csv"))
    errors = pd.read_csv(os.path.join(run_out, "errors.csv"))
    manifest = json.load(open(os.path.join(run_out, "manifest.json")))

    assert page.external == [], "the page must load nothing from elsewhere"
    clusters = sorted(table["cluster"].unique())
    assert [s for s in page.sections if s.startswith("cluster-")] == [f"cluster-{c}" for c in clusters]
    # Each section starts with the images nearest its centroid, in clusters.csv's order (nearest first).
    for c in clusters:
        section = text.split(f'id="cluster-{c}"')[1].split("<section")[0]
        shown = [int(i) for i in re.findall(r'src="thumbs/(\d+)\.jpg"', section)]
        members = table[table["cluster"] == c]
        assert shown[: min(8, len(members))] == members["id"].tolist()[:8]
    # Every thumbnail the page shows exists and is a JPEG; the map is a PNG.
    thumbs = [src for src in page.images if src.startswith("thumbs/")]
    assert len(thumbs) == len(table)  # 10 images, each cluster small enough to show in full
    for src in thumbs:
        assert open(os.path.join(run_out, "report", src), "rb").read(3) == b"\xff\xd8\xff"
    assert "map.png" in page.images
    assert open(os.path.join(run_out, "report", "map.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # The failed files, each with its reason; the collection's numbers.
    assert len(errors) == 3
    for path, reason in zip(errors["path"], errors["error"]):
        assert path in page.cells and reason in page.cells
    assert f"Failed files ({len(errors)})" in text
    for value in ("vgg16 fc6", manifest["weights"]["sha256"][:12], manifest["metric"], manifest["index"]["type"]):
        assert value in text
    assert re.search(r"<dt>images</dt><dd>10</dd>", text) and re.search(r"<dt>errors</dt><dd>3</dd>", text)


def test_report_samples_large_collections_and_says_so(run_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    table = pd.read_csv(out / "clusters.csv")
    largest = int(table["cluster"].value_counts().idxmax())
    # One image moved away since the run: its card says so instead of failing the report.
    moved = table[table["cluster"] == largest].index[0]
    table.loc[moved, "path"] = str(tmp_path / "moved-away.jpg")
    table.to_csv(out / "clusters.csv", index=False)
    # What an approximate index records (recall, search parameters) is shown, however the index step names it.
    manifest = json.load(open(out / "manifest.json"))
    manifest["index"].update(recall=0.9734, search={"nprobe": 16})
    (out / "manifest.json").write_text(json.dumps(manifest))
    pd.DataFrame({"k": [2, 3, 4], "objective": [9.5, 7.25, 6.0], "silhouette": [0.1, 0.2, 0.15]}).to_csv(out / "k_sweep.csv", index=False)

    location = report(str(out), ReportLimits(nearest=2, outliers=1, sections=1, map_points=5, errors=1))
    assert location == f"{out}/report/index.html"
    text, page = read_page(str(out))
    assert [s for s in page.sections if s.startswith("cluster-")] == [f"cluster-{largest}"]
    assert f"Sections show the 1 largest of {table['cluster'].nunique()} clusters" in text
    assert "The map shows a random sample of 5 of the 10 images." in text
    assert "The failed-files list shows the first 1 of 3" in text
    assert text.count('class="card') == 3 and text.count('class="card outlier"') == 1
    assert text.count("no thumbnail") == 1
    # Thumbnails of the earlier, full report that this one does not show are removed.
    assert len(os.listdir(out / "report" / "thumbs")) == 2
    # The k-sweep table, every column, the chosen k in bold.
    assert "<dt>index recall</dt><dd>0.9734</dd>" in text and "<dt>index search.nprobe</dt><dd>16</dd>" in text
    assert "Choosing k" in text and "silhouette" in text and "7.25" in page.cells
    assert re.search(r'<tr class="chosen"><td class="num">3</td>', text)


def test_report_command_on_a_folder_without_clusters(run_out, tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "out"
    shutil.copytree(run_out, out, ignore=shutil.ignore_patterns("clusters.csv", "report"))
    assert main(["report", str(out)]) == 0
    text, page = read_page(str(out))
    assert "No clusters.csv yet" in text and not any(s.startswith("cluster-") for s in page.sections)
    capsys.readouterr()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("imgindex: error:") and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("name", ["page.PNG", "empty.jpg"])
def test_thumbnail_of_a_bad_file_is_a_value_or_os_error(input_dir, name):
    from jobs.report import thumbnail_jpeg

    with pytest.raises((OSError, ValueError)):
        thumbnail_jpeg(os.path.join(input_dir, name))
