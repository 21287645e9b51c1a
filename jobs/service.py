"""The search service's HTTP application on Ray Serve: one replica holds the index and one VGG-16 and answers
searches, cluster listings and thumbnails, under the limits of `ServeOptions`.

Uploads that arrive together are embedded as one batch (`serve.batch`); decoding and the model run in a worker
thread, so health checks, path searches and thumbnails stay quick while a batch runs. Answers are JSON in the shape of
`imgindex query --json`.

What a stranger can make a replica hold is bounded: a request whose Host the options do not admit is refused first
(DNS rebinding); uploads take at most `upload_slots` of the replica's slots, the rest stay for every other request;
an upload body must arrive within `body_timeout_s`; decodes share a memory budget (jobs/uploads.py).
"""

import asyncio
import functools
import hmac
import math
import os
from urllib.parse import unquote

import numpy as np
import pandas as pd
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.options import METRIC_RANGE
from cluster.search import Index, read_clusters
from embedder.config import absolute
from embedder.outdir import CLUSTERS_FILE, DUPLICATES_FILE, open_out
from embedder.reader import image_id
from jobs.report import WEB_DIR, thumbnail_jpeg
from jobs.serve_options import ServeOptions
from jobs.uploads import DecodeBudget, UploadRejected, decode_and_give_back, inspect_upload

TOKEN_COOKIE = "imgindex_token"
STATIC_FILES = {"search.js": "text/javascript", "style.css": "text/css"}
MAX_K = 1000
# Multipart framing around the file itself (boundaries, headers, the file name).
MULTIPART_OVERHEAD = 64 * 1024


def _error(request: Request, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """`{"error": message}`. An error answer to a POST closes the connection: its body may not have been read (a
    refused or stalled upload), and the rest of it must not be taken for the next request."""
    if request.method == "POST":
        headers = {**(headers or {}), "Connection": "close"}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


app = FastAPI(title="imgindex", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(request, exc.status_code, str(exc.detail), exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors())
    return _error(request, 422, problems)


def get(path: str, in_schema: bool = True):
    """Route GET requests for `path` to the decorated method, and HEAD requests too (kept out of the OpenAPI schema,
    where a second method of the same operation would repeat its id)."""

    def register(method):
        app.api_route(path, methods=["HEAD"], include_in_schema=False)(method)
        return app.get(path, include_in_schema=in_schema)(method)

    return register


def weights_label(recorded: dict) -> str:
    """The manifest's weights as /healthz may show them: the built-in names, or `file` and the sha256's first 12 hex
    digits for a state dict file, whose path /healthz must not show."""
    return recorded["name"] if recorded["name"] in ("imagenet", "random") else f"file {recorded['sha256'][:12]}"


@serve.deployment(name="SearchService", max_constructor_retry_count=1)
@serve.ingress(app)
class SearchService:
    """One replica: the loaded OUT (index, clusters; paths looked up by id on demand) and the query-side VGG-16."""

    def __init__(self, out: str, token: str | None, limits: ServeOptions, threads: int):
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)
        self.index = Index.load(out, weights=limits.weights)
        self.embedder = self.index.embedder()
        self.embedder(np.zeros((1, 224, 224, 3), dtype=np.uint8))  # first call allocates; keep that off a request
        self.members = read_clusters(open_out(out), ["id", "cluster", "distance"])
        self.duplicates = open_out(out).read_csv(DUPLICATES_FILE)
        self.token = token
        self.limits = limits
        self.uploads = 0
        self.decode_budget = DecodeBudget(limits.decode_memory_bytes)
        self.thumbnail = functools.lru_cache(maxsize=4096)(thumbnail_jpeg)
        self._embed_batch.set_max_batch_size(min(limits.max_batch_size, limits.max_ongoing_requests))

    def _admit(self, request: Request, token: bool = True) -> None:
        """Refuse a request whose Host header the options do not admit (403), then, for the data endpoints
        (`token`), one without the bearer token when there is one (401)."""
        if not self.limits.admits_host(request.headers.get("host")):
            raise HTTPException(403, f"Host {request.headers.get('host', '(none)')!r} is not answered here; "
                                     "start the service with --allow-host NAME to answer that name")
        if not token or self.token is None:
            return
        header = request.headers.get("authorization", "")
        given = header[len("Bearer "):] if header.startswith("Bearer ") else unquote(request.cookies.get(TOKEN_COOKIE, ""))
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def _check_k(self, k: int) -> None:
        most = min(len(self.index), MAX_K)
        if not 1 <= k <= most:
            raise HTTPException(400, f"k={k}: must be between 1 and {most}")

    # The batch size is set per replica from the options in __init__.
    @serve.batch(batch_wait_timeout_s=0.01)
    async def _embed_batch(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        return list(await asyncio.to_thread(self.embedder, np.stack(pixels)))

    @get("/healthz")
    async def healthz(self, request: Request) -> dict:
        self._admit(request, token=False)
        manifest = self.index.manifest
        return {
            "status": "ok", "images": len(self.index), "metric": self.index.metric,
            "model": f"{manifest['model']} {manifest['layer']}", "weights": weights_label(manifest["weights"]),
            "device": str(self.embedder.device), "clusters": 0 if self.members is None else int(self.members["cluster"].max()) + 1,
            "auth": self.token is not None,
        }

    @app.post("/search")
    async def search_upload(self, request: Request, k: int = 10, max_distance: float | None = None) -> list[dict]:
        self._admit(request)
        self._check_k(k)
        top = METRIC_RANGE[self.index.metric]
        if max_distance is not None and not (math.isfinite(max_distance) and 0 <= max_distance <= top):
            raise HTTPException(400, f"max_distance={max_distance}: must be between 0 and {top:g} for the {self.index.metric} metric")
        length = request.headers.get("content-length", "")
        if not length.isdigit():
            raise HTTPException(411, "send the upload with a Content-Length (multipart/form-data, field 'file')")
        if int(length) > self.limits.max_upload_bytes + MULTIPART_OVERHEAD:
            raise HTTPException(413, f"upload of {int(length):,} bytes; the limit is {self.limits.max_upload_bytes:,}")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(415, "send the image as multipart/form-data in a field named 'file'")
        if self.uploads >= self.limits.upload_slots:
            raise HTTPException(503, f"this replica is busy with {self.uploads} uploads; try again",
                                headers={"Retry-After": "1"})
        self.uploads += 1
        try:
            data, name = await self._receive_upload(request)
            try:
                cost = await asyncio.to_thread(inspect_upload, data, self.limits)
                async with self.decode_budget.hold(cost):
                    pixels = await asyncio.to_thread(decode_and_give_back, data, cost)
            except UploadRejected as e:
                raise HTTPException(e.status, str(e)) from None
            vector = await self._embed_batch(pixels)
        finally:
            self.uploads -= 1
        hits = [h for h in self.index.search_vectors(vector[None, :], k)[0] if max_distance is None or h.distance <= max_distance]
        return [{"query": name, "results": [h.as_dict() for h in hits]}]

    async def _receive_upload(self, request: Request) -> tuple[bytes, str]:
        """The uploaded file's bytes and name, if the whole body arrives within body_timeout_s (else 408): a client
        that sends its headers and then stalls must not hold one of the replica's slots for longer."""
        try:
            form = await asyncio.wait_for(request.form(max_files=1, max_fields=8), self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s") from None
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise HTTPException(400, "multipart field 'file' (the image) is missing")
            return await upload.read(self.limits.max_upload_bytes + 1), upload.filename or "upload"
        finally:
            await form.close()

    @get("/search")
    async def search_path(self, request: Request, path: str, k: int = 10) -> list[dict]:
        self._admit(request)
        self._check_k(k)
        if "\x00" in path:  # no file's path holds one, and os.path.expanduser raises on it
            raise HTTPException(400, f"path {path!r}: a path cannot contain a NUL byte")
        if image_id(absolute(path)) not in self.index.paths:
            raise HTTPException(404, f"{path} is not in this index; POST the image to /search instead")
        hits = self.index.like([path], k)[0]
        return [{"query": path, "results": [h.as_dict() for h in hits]}]

    def _members(self) -> pd.DataFrame:
        if self.members is None:
            raise HTTPException(404, f"no {CLUSTERS_FILE} in this OUT; run `imgindex cluster OUT --clusters K`")
        return self.members

    def _with_paths(self, rows: pd.DataFrame) -> list[dict]:
        """Members as the API answers them: id, path (looked up by id) and distance."""
        found = self.index.paths.find_many(rows["id"])
        return [{"id": int(i), "path": found.get(int(i), ("",))[0], "distance": float(d)} for i, d in zip(rows["id"], rows["distance"])]

    @get("/clusters")
    async def clusters(self, request: Request, examples: int = 4) -> list[dict]:
        self._admit(request)
        if not 0 <= examples <= 100:
            raise HTTPException(400, f"examples={examples}: must be between 0 and 100")
        return [
            {"cluster": int(c), "size": len(rows), "examples": self._with_paths(rows.head(examples))}
            for c, rows in self._members().groupby("cluster", sort=True)
        ]

    @get("/clusters/{cluster}")
    async def cluster(self, request: Request, cluster: int, offset: int = 0, limit: int = 100) -> dict:
        self._admit(request)
        if offset < 0 or not 1 <= limit <= MAX_K:
            raise HTTPException(400, f"offset={offset}, limit={limit}: need offset >= 0 and 1 <= limit <= {MAX_K}")
        rows = self._members()[self._members()["cluster"] == cluster]
        if rows.empty:
            raise HTTPException(404, f"no cluster {cluster}")
        page = rows.iloc[offset : offset + limit]
        return {"cluster": cluster, "size": len(rows), "offset": offset, "members": self._with_paths(page)}

    @get("/duplicates")
    async def duplicate_groups(self, request: Request, offset: int = 0, limit: int = 100) -> dict:
        self._admit(request)
        if offset < 0 or not 1 <= limit <= MAX_K:
            raise HTTPException(400, f"offset={offset}, limit={limit}: need offset >= 0 and 1 <= limit <= {MAX_K}")
        if self.duplicates is None:
            raise HTTPException(404, f"no {DUPLICATES_FILE} in this OUT; run `imgindex duplicates OUT`")
        groups = self.duplicates["group"].unique()  # the file's order: by group, keeper first
        page = self.duplicates[self.duplicates["group"].isin(groups[offset : offset + limit])]
        return {
            "total": len(groups), "offset": offset, "threshold": self.index.manifest["duplicates"]["threshold"],
            "groups": [{"group": int(g), "size": len(rows), "images": rows.drop(columns="group").to_dict("records")}
                       for g, rows in page.groupby("group", sort=False)],
        }

    @get("/thumb/{key}")
    async def thumb(self, request: Request, key: int) -> Response:
        self._admit(request)
        path = self.index.paths.get(key)
        if path is None:
            raise HTTPException(404, f"no image with id {key}")
        try:
            data = await asyncio.to_thread(self.thumbnail, path)
        except (OSError, ValueError) as e:
            raise HTTPException(404, f"no thumbnail for {path}: {e}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @get("/openapi.json", in_schema=False)
    async def openapi(self, request: Request) -> dict:
        if not self.limits.openapi:
            raise HTTPException(404, "Not Found")
        self._admit(request)
        return request.app.openapi()

    @get("/")
    async def page(self, request: Request) -> FileResponse:
        self._admit(request, token=False)
        return FileResponse(os.path.join(WEB_DIR, "search.html"), media_type="text/html")

    @get("/static/{name}")
    async def static(self, request: Request, name: str) -> FileResponse:
        self._admit(request, token=False)
        if name not in STATIC_FILES:
            raise HTTPException(404, f"no static file {name}")
        return FileResponse(os.path.join(WEB_DIR, name), media_type=STATIC_FILES[name])


def serve_app(out: str, token: str | None, options: ServeOptions, cluster_cpus: float, cluster_gpus: float):
    """The bound Serve application: replica count (or autoscaling range), resources and queue bounds."""
    replicas = options.scale
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
                                          "target_ongoing_requests": max(1, options.max_batch_size // 2)}}
    deployment = SearchService.options(
        ray_actor_options=resources,
        max_ongoing_requests=options.max_ongoing_requests,
        max_queued_requests=options.max_queued_requests,
        **scaling,
    )
    return deployment.bind(absolute(out), token, options, threads)
