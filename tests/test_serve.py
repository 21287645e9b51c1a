"""The search service over HTTP: every endpoint against the query API and clusters.csv, every bad input, overload."""

from __future__ import annotations

import io
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image

from jobs.cli import main
from jobs.serve_options import is_loopback, parse_replicas

from conftest import SERVE_TOKEN, jpeg_bytes


def photo(service_out: str) -> str:
    """An indexed photo of the service's OUT."""
    table = pd.read_csv(os.path.join(service_out, "clusters.csv"))
    return sorted(table["path"])[0]


def upload(url: str, headers: dict, data: bytes, k: int | str = 5, name: str = "q.jpg", field: str = "file"):
    return requests.post(f"{url}/search", params={"k": k}, files={field: (name, data)}, headers=headers, timeout=60)


def test_upload_search_equals_the_query_command(service):
    from jobs.query import query

    url, headers, out = service
    path = photo(out)
    answer = upload(url, headers, open(path, "rb").read(), k=5, name=os.path.basename(path))
    assert answer.status_code == 200, answer.text
    [got] = answer.json()
    [expected] = query(out, [path], k=5, as_json=True)
    assert got["query"] == os.path.basename(path)
    assert [h["id"] for h in got["results"]] == [h["id"] for h in expected["results"]]
    assert got["results"][0]["path"] == path and got["results"][0]["distance"] < 1e-3
    for mine, theirs in zip(got["results"], expected["results"]):
        assert mine.keys() == theirs.keys() == {"rank", "id", "path", "distance", "cluster"}
        assert (mine["rank"], mine["path"], mine["cluster"]) == (theirs["rank"], theirs["path"], theirs["cluster"])
        assert mine["distance"] == pytest.approx(theirs["distance"], abs=1e-3)


def test_path_search_equals_query_like(service):
    from jobs.query import query

    url, headers, out = service
    path = photo(out)
    answer = requests.get(f"{url}/search", params={"path": path, "k": 4}, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json() == query(out, [], like=[path], k=4, as_json=True)


def test_clusters_and_members_follow_clusters_csv(service):
    url, headers, out = service
    table = pd.read_csv(os.path.join(out, "clusters.csv"))
    answer = requests.get(f"{url}/clusters", params={"examples": 2}, headers=headers, timeout=30).json()
    assert [(c["cluster"], c["size"]) for c in answer] == sorted(table.groupby("cluster").size().items())
    for entry in answer:
        rows = table[table["cluster"] == entry["cluster"]]
        assert [e["id"] for e in entry["examples"]] == rows["id"].tolist()[:2]
    c = answer[0]["cluster"]
    rows = table[table["cluster"] == c]
    page = requests.get(f"{url}/clusters/{c}", params={"offset": 1, "limit": 2}, headers=headers, timeout=30).json()
    assert page["size"] == len(rows) and page["offset"] == 1
    assert [m["id"] for m in page["members"]] == rows["id"].tolist()[1:3]
    assert [m["path"] for m in page["members"]] == rows["path"].tolist()[1:3]


def test_thumbnail_health_and_page(service):
    url, headers, out = service
    table = pd.read_csv(os.path.join(out, "clusters.csv"))
    thumb = requests.get(f"{url}/thumb/{table['id'][0]}", headers=headers, timeout=30)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as img:
        assert max(img.size) == 160 and img.format == "JPEG"
    health = requests.get(f"{url}/healthz", timeout=10).json()  # no token needed
    assert health["status"] == "ok" and health["images"] == len(table) and health["auth"] is True
    assert health["clusters"] == table["cluster"].max() + 1 and health["device"] == "cpu"
    page = requests.get(url, timeout=10)
    assert page.status_code == 200 and "imgindex search" in page.text and "/static/search.js" in page.text
    for name, kind in (("search.js", "javascript"), ("style.css", "css")):
        static = requests.get(f"{url}/static/{name}", timeout=10)
        assert static.status_code == 200 and kind in static.headers["content-type"]


def test_token_is_required_by_header_or_cookie(service):
    url, _, out = service
    path = photo(out)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": SERVE_TOKEN}):
        answer = requests.get(f"{url}/search", params={"path": path}, headers=headers, timeout=10)
        assert answer.status_code == 401 and "token" in answer.json()["error"]
        assert answer.headers["www-authenticate"] == "Bearer"
    assert requests.get(f"{url}/clusters", timeout=10).status_code == 401
    assert requests.get(f"{url}/clusters", cookies={"imgindex_token": SERVE_TOKEN}, timeout=10).status_code == 200


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data, status, words",
    [
        (b"<html>not an image</html>", 400, "not an image"),
        (b"", 400, "empty"),
        ("truncated", 400, "not a usable image"),
        (np.random.default_rng(0).bytes(300_000), 413, "200,000"),
        (png_bytes(2100, 2000), 413, "2100x2000 pixels"),
    ],
    ids=["text", "empty", "truncated", "too-many-bytes", "too-many-pixels"],
)
def test_bad_uploads_get_a_4xx_json_error(service, data, status, words):
    url, headers, out = service
    if data == "truncated":
        whole = open(photo(out), "rb").read()
        data = whole[: len(whole) // 2]
    answer = upload(url, headers, data)
    assert answer.status_code == status and words in answer.json()["error"], answer.text


def test_bad_requests_get_a_4xx_json_error(service):
    url, headers, out = service
    good = open(photo(out), "rb").read()
    get = lambda route, **params: requests.get(f"{url}{route}", params=params, headers=headers, timeout=30)  # noqa: E731
    cases = [
        (upload(url, headers, good, k=0), 400, "k=0"),
        (upload(url, headers, good, k=11), 400, "between 1 and 10"),
        (upload(url, headers, good, k="many"), 422, "k:"),
        (upload(url, headers, good, field="image"), 400, "field 'file'"),
        (requests.post(f"{url}/search", json={"file": "x"}, headers=headers, timeout=30), 415, "multipart"),
        (get("/search", k=3), 422, "path"),
        (get("/search", path="/not/indexed.jpg"), 404, "not in this index"),
        (get("/search", path=photo(out), k=-1), 400, "k=-1"),
        (get("/clusters/99"), 404, "no cluster 99"),
        (get("/clusters/first"), 422, "cluster"),
        (get("/clusters/0", offset=-1), 400, "offset"),
        (get("/clusters", examples=1000), 400, "examples"),
        (get("/thumb/12345"), 404, "no image with id"),
        (get("/thumb/abc"), 422, "key"),
        (get("/static/serve.py"), 404, "no static file"),
        (get("/nowhere"), 404, "Not Found"),
    ]
    for answer, status, words in cases:
        assert answer.status_code == status and words in answer.json()["error"], (answer.request.url, answer.text)


def test_overload_answers_503_quickly(service):
    """4 requests in the replica and 8 queued (the fixture's limits): the rest of a burst of 24 are refused at once."""
    url, headers, out = service
    data = jpeg_bytes(np.random.default_rng(1).integers(0, 255, (240, 320, 3), dtype=np.uint8))

    def one(_):
        answer = upload(url, headers, data, k=3)
        return answer.status_code, answer.elapsed.total_seconds()

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 4 and statuses.count(503) >= 1, statuses
    assert max(t for s, t in results if s == 503) < 5.0, results


def test_refusals_before_anything_starts(run_out, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert main(["serve", run_out, "--port", port]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    for argv, words in [
        (["serve", run_out, "--host", "0.0.0.0"], "--allow-remote"),
        (["serve", run_out, "--token-file", str(tmp_path / "empty")], "empty"),
        (["serve", run_out, "--token-file", str(tmp_path / "missing")], "No such file"),
        (["serve", run_out, "--replicas", "3-1"], "MIN <= MAX"),
        (["serve", str(tmp_path / "no-out")], "no such output folder"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("imgindex: error:") and words in err and err.count("\n") == 1, err


def test_replicas_and_hosts():
    assert parse_replicas("3") == 3 and parse_replicas("1-4") == (1, 4) and parse_replicas("2-2") == 2
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.4", "::", "example.org"))


def test_a_replica_that_cannot_start_is_one_line(run_out, local_ray, tmp_path, capsys):
    """The replica's own UserError (here: a weights file that is not there) reaches the user as one line, exit 2."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    assert main(["serve", run_out, "--port", port, "--weights", str(tmp_path / "gone.pth")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"imgindex: error: --weights {tmp_path / 'gone.pth'}: not a loadable torch state dict"), last
