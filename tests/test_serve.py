"""The search service over HTTP: every endpoint against the query API and clusters.csv, every bad input, overload."""

from __future__ import annotations

import io
import json
import os
import select
import socket
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import requests
from conftest import SERVE_BODY_TIMEOUT_S, SERVE_MAX_UPLOAD_BYTES, SERVE_TOKEN, jpeg_bytes, png16
from PIL import Image

from jobs.cli import main
from jobs.serve_options import ServeOptions, is_loopback, parse_replicas


def photo(service_out: str) -> str:
    """An indexed photo of the service's OUT."""
    table = pd.read_csv(os.path.join(service_out, "clusters.csv"))
    return sorted(table["path"])[0]


def upload(url: str, headers: dict, data: bytes, k: int | str = 5, name: str = "q.jpg", field: str = "file"):
    return requests.post(f"{url}/search", params={"k": k}, files={field: (name, data)}, headers=headers, timeout=120)


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


def png_header(width: int, height: int) -> bytes:
    """The header of an 8-bit RGB PNG of width x height with no pixel data: enough for the size check before decoding."""
    whole = io.BytesIO()
    Image.new("RGB", (1, 1)).save(whole, "PNG")
    data = whole.getvalue()
    ihdr = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + data[24:29]
    return data[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + data[33:]


@pytest.mark.parametrize(
    "data, status, words",
    [
        (b"<html>not an image</html>", 400, "not an image"),
        (b"", 400, "empty"),
        ("truncated", 400, "not a usable image"),
        (np.random.default_rng(0).bytes(SERVE_MAX_UPLOAD_BYTES + 1000), 413, f"{SERVE_MAX_UPLOAD_BYTES:,}"),
        (png_header(8000, 7000), 413, "8000x7000 pixels"),
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
        (get("/search", path="~\x00x"), 400, "NUL byte"),
        (get("/search", path="\x00"), 400, "NUL byte"),
        (get("/search", path="~no-such-user-x/a.jpg"), 404, "not in this index"),
        (get("/search", path="/" + "a" * 20_000), 404, "not in this index"),
        (requests.get(f"{url}/search?path=%ff%fe", headers=headers, timeout=30), 404, "not in this index"),
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
    """8 requests in the replica, 6 of them uploads, and 8 queued (the fixture's limits): the rest of a burst of 24
    uploads are refused at once."""
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
    (tmp_path / "binary").write_bytes(bytes(range(256)))
    (tmp_path / "two words").write_text("secret token\n")
    for argv, words in [
        (["serve", run_out, "--host", "0.0.0.0"], "--allow-remote"),
        (["serve", run_out, "--token-file", str(tmp_path / "empty")], "empty"),
        (["serve", run_out, "--token-file", str(tmp_path / "missing")], "No such file"),
        (["serve", run_out, "--token-file", str(tmp_path / "binary")], "not a text token (byte 0x80 at offset 128"),
        (["serve", run_out, "--token-file", str(tmp_path / "two words")], "one word of printable ASCII"),
        (["serve", run_out, "--port", "99999"], "between 1 and 65535, not 99999"),
        (["serve", run_out, "--replicas", "3-1"], "MIN <= MAX"),
        (["serve", run_out, "--decode-memory", "lots"], "--decode-memory 'lots': expected a size"),
        (["serve", run_out, "--decode-memory", "1000"], "at least 1M"),
        (["serve", run_out, "--allow-host", "http://box:8000"], "without port or scheme"),
        (["serve", str(tmp_path / "no-out")], "no such output folder"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("imgindex: error:") and words in err and err.count("\n") == 1, err


def test_replicas_and_hosts():
    assert parse_replicas("3") == 3 and parse_replicas("1-4") == (1, 4) and parse_replicas("2-2") == 2
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.4", "::", "example.org", "a.localhost"))
    local = ServeOptions()
    answered = ["127.0.0.1:8000", "127.0.0.1", "LOCALHOST:8000", "localhost.", "app.localhost:1", "[::1]:8000", "127.3.2.1"]
    refused = ["evil.example:8000", "127.0.0.1.nip.io", "localhost.evil.example", "[::1", "::1", "0.0.0.0:8000", "", None]
    assert all(local.admits_host(h) for h in answered) and not any(local.admits_host(h) for h in refused)
    named = ServeOptions(allow_hosts=("box.lan",))
    assert named.admits_host("box.lan:8000") and named.admits_host("localhost") and not named.admits_host("other.lan")
    remote = ServeOptions(host="0.0.0.0", allow_remote=True)
    assert remote.admits_host("192.168.1.4:8000") and remote.admits_host("anything")
    remote_named = ServeOptions(host="0.0.0.0", allow_remote=True, allow_hosts=("box.lan",))
    assert remote_named.admits_host("box.lan") and not remote_named.admits_host("192.168.1.4:8000")
    assert [ServeOptions(max_ongoing_requests=n).upload_slots for n in (1, 2, 4, 8, 16)] == [1, 1, 3, 6, 12]


def test_healthz_names_no_weights_path():
    from jobs.service import weights_label

    assert weights_label({"name": "imagenet", "sha256": "ab" * 32}) == "imagenet"
    assert weights_label({"name": "/home/me/models/vgg16.pth", "sha256": "0123456789ab" + "0" * 52}) == "file 0123456789ab"


def test_only_loopback_host_names_are_answered(service):
    """Bound to 127.0.0.1, the service answers a page reached by DNS rebinding (a foreign Host) with 403 on every
    route, the open ones included, before the token is even looked at."""
    url, headers, out = service
    port = url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.nip.io:{port}"):
        for method, route in (("GET", "/healthz"), ("GET", "/"), ("GET", "/static/search.js"), ("GET", "/clusters"),
                              ("POST", "/search"), ("HEAD", "/healthz")):
            answer = requests.request(method, f"{url}{route}", headers={**headers, "Host": host}, timeout=10)
            assert answer.status_code == 403, (host, route, answer.status_code)
            if method != "HEAD":
                assert "--allow-host" in answer.json()["error"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "app.localhost"):
        assert requests.get(f"{url}/healthz", headers={"Host": host}, timeout=10).status_code == 200, host


def test_open_endpoints_are_the_documented_ones(service):
    """Without the token only /, /static/*, /healthz and Serve's own /-/healthz and /-/routes answer, and none of them
    shows a file path; /openapi.json is closed (no --openapi); HEAD answers wherever GET does, with no body."""
    from jobs.service import app

    url, headers, out = service
    table = pd.read_csv(os.path.join(out, "clusters.csv"))
    examples = {"{cluster}": str(table["cluster"][0]), "{key}": str(table["id"][0]), "{name}": "search.js"}
    query = {"/search": {"path": photo(out)}}
    open_routes = {"/", "/static/{name}", "/healthz"}
    gets = sorted(path for path, operations in app.openapi()["paths"].items() if "get" in operations) + ["/openapi.json"]
    assert set(gets) >= open_routes | {"/search", "/clusters", "/clusters/{cluster}", "/thumb/{key}"}
    for route in gets:
        path = route
        for name, value in examples.items():
            path = path.replace(name, value)
        anonymous = requests.get(f"{url}{path}", params=query.get(route), timeout=30)
        with_token = requests.get(f"{url}{path}", params=query.get(route), headers=headers, timeout=30)
        head = requests.head(f"{url}{path}", params=query.get(route), headers=headers, timeout=30)
        if route == "/openapi.json":
            assert anonymous.status_code == with_token.status_code == head.status_code == 404
            continue
        if route == "/duplicates":  # run_out has no duplicates.csv: 404 behind the token (tests/test_duplicates.py)
            assert anonymous.status_code == 401 and with_token.status_code == head.status_code == 404
            continue
        assert with_token.status_code == head.status_code == 200 and head.content == b"", (route, head.status_code)
        assert head.headers["content-type"] == with_token.headers["content-type"]
        if route in open_routes:
            assert anonymous.status_code == 200 and out not in anonymous.text and "/tmp" not in anonymous.text, route
        else:
            assert anonymous.status_code == 401, route
    assert requests.post(f"{url}/healthz", timeout=10).status_code == 405
    assert requests.get(f"{url}/-/healthz", timeout=10).text == "success"
    assert requests.get(f"{url}/-/routes", timeout=10).json() == {"/": "imgindex"}


def _stalled_upload(url: str) -> socket.socket:
    """A connection that sends an upload's headers and the first bytes of its body, then nothing more."""
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)))
    connection.sendall(
        f"POST /search?k=3 HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {SERVE_TOKEN}\r\n"
        "Content-Type: multipart/form-data; boundary=b0\r\nContent-Length: 100000\r\n\r\n--b0\r\n".encode()
    )
    connection.setblocking(False)
    return connection


def test_stalled_uploads_are_dropped_and_healthz_answers(service):
    """50 uploads that send their headers and stall: /healthz still answers within 2 s, and every one of them is
    answered (408 once the body timeout passes, or 503 at once beyond the replica's upload slots) and closed within
    the body timeout, plus a margin for the machine."""
    url, headers, out = service
    opened = time.monotonic()
    stalled = [_stalled_upload(url) for _ in range(50)]
    try:
        time.sleep(0.5)  # let the proxy hand them to the replica and its queue
        # While the replica is still turning the surplus away, Serve's queue may be full for a moment: a health check
        # asked then gets 503 and asks again, as a load balancer's does. It must be answered within 2 s.
        while True:
            health = requests.get(f"{url}/healthz", timeout=2)
            if health.status_code == 200 or time.monotonic() - opened > 2:
                break
            time.sleep(0.1)
        assert health.status_code == 200 and time.monotonic() - opened < 2.5, health.text
        received = {connection: b"" for connection in stalled}
        closed_after: dict[socket.socket, float] = {}
        while len(closed_after) < len(stalled) and time.monotonic() - opened < SERVE_BODY_TIMEOUT_S + 3:
            readable, _, _ = select.select([c for c in stalled if c not in closed_after], [], [], 0.2)
            for connection in readable:
                chunk = connection.recv(65536)
                received[connection] += chunk
                if not chunk:
                    closed_after[connection] = time.monotonic() - opened
        assert len(closed_after) == len(stalled), f"{len(stalled) - len(closed_after)} stalled uploads still open"
        assert max(closed_after.values()) < SERVE_BODY_TIMEOUT_S + 2, sorted(closed_after.values())
        statuses = [data.split(b" ", 2)[1] for data in received.values()]
        print(f"/healthz in {health.elapsed.total_seconds():.3f} s; {statuses.count(b'408')} answered 408, "
              f"{statuses.count(b'503')} 503; all closed {max(closed_after.values()):.2f} s after opening")
        assert set(statuses) <= {b"408", b"503"} and statuses.count(b"408") >= 1, statuses
    finally:
        for connection in stalled:
            connection.close()
    assert upload(url, headers, open(photo(out), "rb").read()).status_code == 200


def _replica_pid(serve_pid: int) -> int:
    import psutil

    [replica] = [p.pid for p in psutil.Process(serve_pid).children(recursive=True)
                 if "ServeReplica:imgindex:SearchService" in " ".join(p.cmdline())]
    return replica


def _memory_mib(pid: int, field: str) -> float:
    """VmRSS (resident now) or VmHWM (resident at the peak since the last reset) of a process, in MiB."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-RSS reset")
def test_large_decodes_are_bounded_and_memory_given_back(service_process):
    """Six uploads at once of a 395 KB PNG that decodes to 7000x7000 16-bit RGBA (about 1.2 GB for decode_image):
    they all answer, the replica's resident memory never grows by more than the decode budget (the default 2G) and
    256 MiB, and after them it is back within 256 MiB of where it started."""
    url, headers, out, process = service_process
    data = png16(7000, 7000, 4)
    assert len(data) <= SERVE_MAX_UPLOAD_BYTES
    replica = _replica_pid(process.pid)
    with open(f"/proc/{replica}/clear_refs", "w") as reset:
        reset.write("5")  # resets VmHWM to the current resident size
    before = _memory_mib(replica, "VmRSS")
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: upload(url, headers, data, k=3, name="large.png"), range(6)))
    assert [a.status_code for a in answers] == [200] * 6, [a.text[:200] for a in answers]
    growth, held = _memory_mib(replica, "VmHWM") - before, _memory_mib(replica, "VmRSS") - before
    budget = ServeOptions().decode_memory_bytes / 1024**2
    print(f"replica resident before {before:.0f} MiB; peak +{growth:.0f} MiB; after +{held:.0f} MiB")
    assert growth < budget + 256, f"peak grew by {growth:.0f} MiB"
    assert held < 256, f"{held:.0f} MiB still held"


def test_inspect_upload_refuses_what_the_decode_budget_cannot_hold():
    from jobs.uploads import UploadRejected, inspect_upload

    header = png16(7000, 7000, 4)
    assert inspect_upload(header, ServeOptions()) == 7000 * 7000 * 26
    with pytest.raises(UploadRejected, match=r"needs about 1,215 MiB; the limit is 1,024 MiB \(--decode-memory\)"):
        inspect_upload(header, ServeOptions(decode_memory="1G"))
    assert inspect_upload(b"<html>not an image</html>", ServeOptions()) == 0


def test_files_that_once_escaped_the_decoder_are_400_uploads():
    """The decoder fuzz's findings (tests/fixtures/decode) as uploads: the header check and the decode refuse each with
    UploadRejected 400, whatever Pillow's plugin raises."""
    from jobs.uploads import UploadRejected, decode_and_give_back, inspect_upload

    folder = os.path.join(os.path.dirname(__file__), "fixtures", "decode")
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        with pytest.raises(UploadRejected) as refused:
            decode_and_give_back(data, inspect_upload(data, ServeOptions()))
        assert refused.value.status == 400 and "not a usable image" in str(refused.value), name


# One (format, mode) per row of the cost table in jobs/uploads.py, each written by Pillow (the 16-bit PNG by png16);
# the mode is the one Pillow opens the file in.
COST_CASES = {
    "png-1": ("PNG", "1", {}), "png-L": ("PNG", "L", {}), "png-P": ("PNG", "P", {}),
    "png-P-transparent": ("PNG", "P", {"transparency": 0}), "png-LA": ("PNG", "LA", {}), "png-RGB": ("PNG", "RGB", {}),
    "png-RGBA": ("PNG", "RGBA", {}), "png-I;16": ("PNG", "I;16", {}), "png-RGBA-16bit": ("PNG16", "RGBA", {}),
    "jpeg-L": ("JPEG", "L", {}), "jpeg-RGB": ("JPEG", "RGB", {}),
    "jpeg-CMYK": ("JPEG", "CMYK", {}), "jpeg-RGB-rotated": ("JPEG", "RGB", {"exif": 6}), "tiff-I": ("TIFF", "I", {}),
    "tiff-F": ("TIFF", "F", {}), "tiff-RGBA": ("TIFF", "RGBA", {}), "gif-P-transparent": ("GIF", "P", {"transparency": 0}),
    "webp-RGB": ("WEBP", "RGB", {}), "webp-RGBA": ("WEBP", "RGBA", {}), "jpeg2000-RGB": ("JPEG2000", "RGB", {}),
    "avif-RGB": ("AVIF", "RGB", {}), "avif-RGBA": ("AVIF", "RGBA", {}),
}
FEATURES = {"WEBP": "webp", "JPEG2000": "jpg_2000", "AVIF": "avif"}

# Run in a fresh process: each file is decoded once to load its plugin and libraries, then, with freed memory handed
# back and the peak reset, once more while measured.
MEASURE_DECODES = """
import ctypes, json, sys
from embedder.reader import decode_image
trim = ctypes.CDLL(None).malloc_trim
def field(name):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(name + ":"))
peaks = {}
for path in sys.argv[1:]:
    data = open(path, "rb").read()
    decode_image(data)
    trim(0)
    open("/proc/self/clear_refs", "w").write("5")
    before = field("VmRSS")
    decode_image(data)
    peaks[path] = field("VmHWM") - before
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-RSS reset")
def test_decode_cost_bounds_what_decoding_allocates(tmp_path):
    """decode_cost, read from the header, is at least what decode_image allocates at its peak for every mode and
    decoder the table names (1600x1600 images), and not more than 1.5 times it plus 4 MiB (the measured peak of the
    same decode varies by up to a quarter between runs, with what the allocator kept from the one before)."""
    from PIL import features

    from jobs.uploads import decode_cost

    side = 1600
    files = {}
    for name, (fmt, mode, extra) in COST_CASES.items():
        if fmt in FEATURES and not features.check(FEATURES[fmt]):
            continue
        if fmt == "PNG16":
            data = png16(side, side, 4)
        else:
            # Half-transparent where the mode has alpha: encoders drop an alpha channel that is opaque everywhere.
            image = Image.new("RGBA", (side, side), (200, 120, 40, 128)).convert(mode if "A" in mode else "RGB")
            image = image.convert(mode)
            options = dict(extra)
            if "exif" in options:
                exif = Image.Exif()
                exif[0x0112] = options.pop("exif")
                options["exif"] = exif
            buffer = io.BytesIO()
            image.save(buffer, fmt, **options, **({"speed": 10} if fmt == "AVIF" else {}))
            data = buffer.getvalue()
        files[name] = tmp_path / name
        files[name].write_bytes(data)
    measured = subprocess.run([sys.executable, "-c", MEASURE_DECODES, *map(str, files.values())], capture_output=True,
                              text=True, check=True, env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout
    peaks = json.loads(measured)
    for name, path in files.items():
        with Image.open(path) as image:
            assert image.mode == COST_CASES[name][1], (name, image.mode)
            cost = decode_cost(image)
        peak = peaks[str(path)]
        print(f"{name:20s} peak {peak / side**2:5.1f} bytes/pixel, cost {cost / side**2:5.1f}")
        assert peak <= cost <= 1.5 * peak + 4 * 1024**2, (name, peak / side**2, cost / side**2)


def test_a_replica_that_cannot_start_is_one_line(run_out, local_ray, tmp_path, capsys):
    """The replica's own UserError (here: a weights file that is not there) reaches the user as one line, exit 2."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    assert main(["serve", run_out, "--port", port, "--weights", str(tmp_path / "gone.pth")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"imgindex: error: --weights {tmp_path / 'gone.pth'}: not a loadable torch state dict"), last
