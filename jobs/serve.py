"""`imgindex serve OUT` / `python -m jobs.serve`: nearest-image search as an HTTP service on Ray Serve, with a web page.

Each replica holds the FAISS index and one VGG-16 (on a GPU when the cluster has one). Uploads that arrive together
are embedded as one batch (`serve.batch`); decoding and the model run in a worker thread, so health checks, path
searches and thumbnails stay quick while a batch runs. Answers are JSON in the shape of `imgindex query --json`.
"""

import asyncio
import functools
import hmac
import io
import ipaddress
import logging
import os
import re
import signal
import socket
import sys
import threading
import warnings
from dataclasses import dataclass
from urllib.parse import unquote

import numpy as np
import pandas as pd
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.index import INDEX_FILE
from cluster.search import CLUSTERS_FILE, Index, open_out
from embedder.config import UserError, absolute
from embedder.reader import ImageError, decode_image, image_id
from embedder.writer import MANIFEST
from jobs.report import WEB_DIR, thumbnail_jpeg

log = logging.getLogger("imgindex")

APP_NAME = "imgindex"
TOKEN_COOKIE = "imgindex_token"
STATIC_FILES = {"search.js": "text/javascript", "style.css": "text/css"}
MAX_K = 1000
# Multipart framing around the file itself (boundaries, headers, the file name).
MULTIPART_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class ServeLimits:
    """What one replica accepts and holds: upload size, concurrency, queue (beyond which Serve answers 503)."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_upload_pixels: int = 50_000_000
    max_ongoing_requests: int = 16
    max_queued_requests: int = 32
    max_batch_size: int = 8


class UploadRejected(Exception):
    """An upload refused before the model sees it; carries the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the image header without decoding it; None if Pillow cannot even open it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Image.DecompressionBombError as e:
        raise UploadRejected(413, f"image too large: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError):
        return None


def decode_upload(data: bytes, limits: ServeLimits) -> np.ndarray:
    """Uploaded bytes -> model pixels with the job's decoder, after the byte and pixel limits are checked."""
    if len(data) > limits.max_upload_bytes:
        raise UploadRejected(413, f"upload of {len(data):,} bytes; the limit is {limits.max_upload_bytes:,}")
    size = image_size(data)
    if size and size[0] * size[1] > limits.max_upload_pixels:
        raise UploadRejected(413, f"image of {size[0]}x{size[1]} pixels; the limit is {limits.max_upload_pixels:,} pixels")
    try:
        return decode_image(data)
    except ImageError as e:
        raise UploadRejected(400, f"not a usable image: {e}") from None


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


app = FastAPI(title="imgindex", docs_url=None, redoc_url=None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors())
    return _error(422, problems)


@serve.deployment(name="SearchService", max_constructor_retry_count=1)
@serve.ingress(app)
class SearchService:
    """One replica: the loaded OUT (index, id -> path, clusters) and the query-side VGG-16."""

    def __init__(self, out: str, weights: str | None, token: str | None, limits: ServeLimits, threads: int):
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)
        self.index = Index.load(out, weights=weights)
        self.embedder = self.index.embedder()
        self.embedder(np.zeros((1, 224, 224, 3), dtype=np.uint8))  # first call allocates; keep that off a request
        folder = open_out(out)
        self.members = (
            pd.read_csv(io.BytesIO(folder.read_bytes(CLUSTERS_FILE)), usecols=["id", "path", "cluster", "distance"])
            if folder.exists(CLUSTERS_FILE) else None
        )
        self.token = token
        self.limits = limits
        self.thumbnail = functools.lru_cache(maxsize=4096)(thumbnail_jpeg)
        self._embed_batch.set_max_batch_size(min(limits.max_batch_size, limits.max_ongoing_requests))

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        given = header[len("Bearer "):] if header.startswith("Bearer ") else unquote(request.cookies.get(TOKEN_COOKIE, ""))
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def _check_k(self, k: int) -> None:
        most = min(len(self.index), MAX_K)
        if not 1 <= k <= most:
            raise HTTPException(400, f"k={k}: must be between 1 and {most}")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        return list(await asyncio.to_thread(self.embedder, np.stack(pixels)))

    @app.get("/healthz")
    async def healthz(self) -> dict:
        manifest = self.index.manifest
        return {
            "status": "ok", "images": len(self.index), "metric": self.index.metric,
            "model": f"{manifest['model']} {manifest['layer']}", "weights": manifest["weights"]["name"],
            "device": str(self.embedder.device), "clusters": 0 if self.members is None else int(self.members["cluster"].max()) + 1,
            "auth": self.token is not None,
        }

    @app.post("/search")
    async def search_upload(self, request: Request, k: int = 10) -> list[dict]:
        self._authorize(request)
        self._check_k(k)
        length = request.headers.get("content-length", "")
        if not length.isdigit():
            raise HTTPException(411, "send the upload with a Content-Length (multipart/form-data, field 'file')")
        if int(length) > self.limits.max_upload_bytes + MULTIPART_OVERHEAD:
            raise HTTPException(413, f"upload of {int(length):,} bytes; the limit is {self.limits.max_upload_bytes:,}")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(415, "send the image as multipart/form-data in a field named 'file'")
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise HTTPException(400, "multipart field 'file' (the image) is missing")
            data = await upload.read(self.limits.max_upload_bytes + 1)
            name = upload.filename or "upload"
        try:
            pixels = await asyncio.to_thread(decode_upload, data, self.limits)
        except UploadRejected as e:
            raise HTTPException(e.status, str(e)) from None
        vector = await self._embed_batch(pixels)
        hits = self.index.search_vectors(vector[None, :], k)[0]
        return [{"query": name, "results": [h.as_dict() for h in hits]}]

    @app.get("/search")
    async def search_path(self, request: Request, path: str, k: int = 10) -> list[dict]:
        self._authorize(request)
        self._check_k(k)
        if image_id(absolute(path)) not in self.index.paths:
            raise HTTPException(404, f"{path} is not in this index; POST the image to /search instead")
        hits = self.index.like([path], k)[0]
        return [{"query": path, "results": [h.as_dict() for h in hits]}]

    def _members(self) -> pd.DataFrame:
        if self.members is None:
            raise HTTPException(404, f"no {CLUSTERS_FILE} in this OUT; run `imgindex cluster OUT --clusters K`")
        return self.members

    @app.get("/clusters")
    async def clusters(self, request: Request, examples: int = 4) -> list[dict]:
        self._authorize(request)
        if not 0 <= examples <= 100:
            raise HTTPException(400, f"examples={examples}: must be between 0 and 100")
        return [
            {"cluster": int(c), "size": len(rows), "examples": rows.head(examples)[["id", "path", "distance"]].to_dict("records")}
            for c, rows in self._members().groupby("cluster", sort=True)
        ]

    @app.get("/clusters/{cluster}")
    async def cluster(self, request: Request, cluster: int, offset: int = 0, limit: int = 100) -> dict:
        self._authorize(request)
        if offset < 0 or not 1 <= limit <= MAX_K:
            raise HTTPException(400, f"offset={offset}, limit={limit}: need offset >= 0 and 1 <= limit <= {MAX_K}")
        rows = self._members()[self._members()["cluster"] == cluster]
        if rows.empty:
            raise HTTPException(404, f"no cluster {cluster}")
        page = rows.iloc[offset : offset + limit][["id", "path", "distance"]]
        return {"cluster": cluster, "size": len(rows), "offset": offset, "members": page.to_dict("records")}

    @app.get("/thumb/{key}")
    async def thumb(self, request: Request, key: int) -> Response:
        self._authorize(request)
        path = self.index.paths.get(key)
        if path is None:
            raise HTTPException(404, f"no image with id {key}")
        try:
            data = await asyncio.to_thread(self.thumbnail, path)
        except (OSError, ValueError) as e:
            raise HTTPException(404, f"no thumbnail for {path}: {e}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/")
    async def page(self) -> FileResponse:
        return FileResponse(os.path.join(WEB_DIR, "search.html"), media_type="text/html")

    @app.get("/static/{name}")
    async def static(self, name: str) -> FileResponse:
        if name not in STATIC_FILES:
            raise HTTPException(404, f"no static file {name}")
        return FileResponse(os.path.join(WEB_DIR, name), media_type=STATIC_FILES[name])


def parse_replicas(text: str) -> int | tuple[int, int]:
    """`N` (a fixed number of replicas) or `MIN-MAX` (Serve autoscaling between the two)."""
    low, _, high = text.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise UserError(f"--replicas {text}: expected N or MIN-MAX, e.g. 2 or 1-4") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise UserError(f"--replicas {text}: need 1 <= MIN <= MAX")
    return bounds[0] if bounds[0] == bounds[1] else bounds


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: str) -> str:
    """The bearer token in `token_file` (surrounding whitespace removed); a UserError if unreadable or empty."""
    try:
        with open(absolute(token_file), encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise UserError(f"--token-file {token_file}: {e.strerror}") from None
    if not token:
        raise UserError(f"--token-file {token_file}: the file is empty")
    return token


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def serve_app(out: str, weights: str | None, token: str | None, limits: ServeLimits, replicas: int | tuple[int, int],
              cluster_cpus: float, cluster_gpus: float):
    """The bound Serve application: replica count (or autoscaling range), resources and queue bounds."""
    most = replicas if isinstance(replicas, int) else replicas[1]
    if cluster_gpus > 0:
        resources, threads = {"num_gpus": 1, "num_cpus": 1}, 1
    else:
        resources, threads = {"num_cpus": 1}, max(1, int(cluster_cpus) // most)
    if isinstance(replicas, int):
        scaling = {"num_replicas": replicas}
    else:
        # Scale on the requests each replica holds: half a batch in flight per replica is enough to add one.
        scaling = {"autoscaling_config": {"min_replicas": replicas[0], "max_replicas": replicas[1],
                                          "target_ongoing_requests": max(1, limits.max_batch_size // 2)}}
    deployment = SearchService.options(
        ray_actor_options=resources,
        max_ongoing_requests=limits.max_ongoing_requests,
        max_queued_requests=limits.max_queued_requests,
        **scaling,
    )
    return deployment.bind(absolute(out), weights, token, limits, threads)


def _start_failure(error: RuntimeError) -> UserError:
    """The replica's own one-line reason (bad weights, unreadable OUT) when its constructor raised a UserError."""
    status = serve.status().applications.get(APP_NAME)
    details = "\n".join(d.message for d in status.deployments.values()) if status else ""
    reasons = re.findall(r"UserError: (.+)", details)
    return UserError(reasons[-1] if reasons else f"the search service did not start: {error}")


def serve_forever(out: str, host: str = "127.0.0.1", port: int = 8000, replicas: str = "1", allow_remote: bool = False,
                  token_file: str | None = None, weights: str | None = None, address: str | None = None,
                  limits: ServeLimits = ServeLimits()) -> None:
    """Run the search service until Ctrl-C (or SIGTERM), then shut Serve down.

    Parameters
    ----------
    out
        A finished output folder (manifest.json, index.faiss; clusters.csv for the cluster endpoints).
    host, port
        Where Serve's HTTP proxy listens. A non-loopback host needs `allow_remote`.
    replicas
        `N` replicas, or `MIN-MAX` for Serve autoscaling; each holds the index and one VGG-16 (one GPU each when the
        cluster has GPUs, else one CPU reserved and the node's cores shared between replicas as torch threads).
    allow_remote
        Permit a non-loopback `host` (a warning is printed; use `token_file` there).
    token_file
        File holding a bearer token every data endpoint then requires (`Authorization: Bearer ...`, or the
        page's cookie).
    weights
        Where to load the index's weights from, if not where the manifest says (sha256 checked).
    address
        Ray cluster to run on (default: RAY_ADDRESS, else an embedded local Ray).
    limits
        Upload limits, per-replica concurrency and queue length.
    """
    open_out(out, (MANIFEST, INDEX_FILE))
    scale = parse_replicas(replicas)
    if not is_loopback(host):
        if not allow_remote:
            raise UserError(f"--host {host} is reachable from other machines; add --allow-remote if that is intended")
        log.warning("listening on %s: anyone who can reach it can search this collection and see its images%s",
                    host, "" if token_file else " (no --token-file: no authentication)")
    token = read_token(token_file) if token_file else None
    if not (address or os.environ.get("RAY_ADDRESS")):
        _check_port_free(host, port)

    import ray

    from embedder.pipeline import start_ray

    start_ray(address)
    resources = ray.cluster_resources()
    quiet = {"enable_access_log": False, "log_level": "WARNING"}
    serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    stop = threading.Event()
    try:
        try:
            serve.run(serve_app(out, weights, token, limits, scale, resources.get("CPU", 1), resources.get("GPU", 0)),
                      name=APP_NAME, route_prefix="/", logging_config=quiet)
        except RuntimeError as e:
            raise _start_failure(e) from None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        print(f"imgindex: serving {absolute(out)} on http://{host}:{port}/ (Ctrl-C to stop)", file=sys.stderr, flush=True)
        stop.wait()
        log.info("stopping the search service")
    finally:
        serve.shutdown()


if __name__ == "__main__":
    from jobs.cli import entry

    entry(["serve", *sys.argv[1:]])
