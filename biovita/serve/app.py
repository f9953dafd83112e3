"""`biovita serve`: identify and search on Ray Serve, with a web page.

    POST /identify   multipart `file` (+ `rank`, `k`)      -> the top-k taxa, probability and cosine
    POST /search     multipart `file` or form `text` (+ `k`) -> the nearest gallery recordings and photos
    GET  /           the page: drop or pick a file, or type a name
    GET  /media/{audio|image}/{id}                          -> a gallery item's encoded bytes

Requests are decoded on the replica's threads and their forward passes batched
(`serve.batch`); replicas and autoscaling come from `ServeConfig`. A bad request gets a JSON
error (`{"error": reason, "message": ...}`) with a 4xx status; the service keeps serving.
Beyond `max_ongoing_requests` per replica and `max_queued_requests` waiting, a request is
answered with 503 and `Retry-After`: an accepted request waits behind at most that many.
"""

# (no `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime,
# and Serve pickles the app; string annotations leave pydantic models unbuilt)
import asyncio
import dataclasses
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.config import BackpressureConfig

from biovita.data.validate import check_store
from biovita.embed.cache import gallery_embeddings
from biovita.errors import MediaError
from biovita.models.checkpoint import resolve_checkpoint
from biovita.predict import Predictor, Rank
from biovita.runtime import init_ray
from biovita.serve.gallery import Gallery
from biovita.structured import build

# reason -> status: what the client sent is not what a route takes
STATUS = {"empty_file": 400, "missing_file": 400, "html_page": 415, "not_media": 415,
          "not_audio": 415, "not_image": 415, "too_large": 413, "undecodable": 422,
          "non_finite": 422, "unknown_rank": 422, "bad_k": 422, "no_query": 400}
MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg", "opus": "audio/ogg",
               "mp3": "audio/mpeg", "m4a": "audio/mp4", "jpeg": "image/jpeg", "png": "image/png",
               "webp": "image/webp", "tiff": "image/tiff", "gif": "image/gif", "bmp": "image/bmp"}


@dataclass
class Autoscaling:
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 4.0


@dataclass
class ServeConfig:
    checkpoint: str = ""
    gallery: str = ""  # a store whose media are searched ("" = identify only)
    clap: str | None = None
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    replicas: int = 1  # fixed replicas (ignored when autoscaling.max_replicas > 1)
    autoscaling: Autoscaling = field(default_factory=Autoscaling)
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    # admission: requests a replica works on at once, and requests each proxy holds for the
    # deployment beyond that; the excess is answered at once with 503 and Retry-After
    max_ongoing_requests: int = 16
    max_queued_requests: int = 32
    retry_after_s: float = 1.0
    max_upload_mb: float = 50.0
    max_pixels: int = 50_000_000
    default_k: int = 5
    max_k: int = 50


class RequestError(Exception):
    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason, self.message = reason, message or reason.replace("_", " ")

    @property
    def status(self) -> int:
        return STATUS.get(self.reason, 400)


def page() -> str:
    return resources.files("biovita.serve").joinpath("page.html").read_text()


api = FastAPI(title="biovita", description=__doc__)


@api.exception_handler(RequestError)
async def _request_error(request: Request, e: RequestError):
    return JSONResponse({"error": e.reason, "message": e.message}, status_code=e.status)


@serve.deployment(name="biovita")
@serve.ingress(api)
class BioVITAService:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.predictor = Predictor(cfg.checkpoint, clap=cfg.clap)
        # embedded by `prepare` before the replicas start: here a read of the cache
        self.gallery = (Gallery(cfg.gallery, gallery_embeddings(cfg.gallery, cfg.checkpoint))
                        if cfg.gallery else None)
        self._embed.set_max_batch_size(cfg.max_batch_size)
        self._embed.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _embed(self, inputs: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        """One forward per modality for the requests that arrived together."""
        out: list[np.ndarray | None] = [None] * len(inputs)
        for m in ("audio", "image"):
            idx = [i for i, (mod, _) in enumerate(inputs) if mod == m]
            if idx:
                emb = await asyncio.to_thread(self.predictor.encode, m, [inputs[i][1] for i in idx])
                for i, e in zip(idx, emb):
                    out[i] = e
        return out

    async def _upload(self, file: UploadFile | None) -> tuple[str, np.ndarray]:
        if file is None:
            raise RequestError("missing_file", "send the recording or photo as multipart field `file`")
        limit = int(self.cfg.max_upload_mb * 2**20)
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise RequestError("too_large", f"uploads are limited to {self.cfg.max_upload_mb:g} MB")
        try:
            modality, x = await asyncio.to_thread(self.predictor.decode, data, self.cfg.max_pixels)
        except MediaError as e:
            raise RequestError(e.reason, f"{file.filename or 'the upload'}: {e}") from None
        return modality, await self._embed((modality, x))

    def _k(self, k: int | None) -> int:
        k = self.cfg.default_k if k is None else k
        if not 1 <= k <= self.cfg.max_k:
            raise RequestError("bad_k", f"k must be between 1 and {self.cfg.max_k}")
        return k

    @api.get("/", response_class=HTMLResponse)
    def index(self):
        return page()

    @api.get("/health")
    def health(self):
        return {"ok": True, "gallery": {m: len(v) for m, v in self.gallery.items.items()}
                if self.gallery else {}}

    @api.post("/identify")
    async def identify(self, file: UploadFile | None = File(None), rank: str = Form("species"),
                       k: int | None = Form(None)):
        if rank not in {r.value for r in Rank}:
            raise RequestError("unknown_rank", f"rank must be one of {', '.join(r.value for r in Rank)}")
        k = self._k(k)
        modality, v = await self._upload(file)
        return {"file": file.filename, "modality": modality, "rank": rank,
                "taxa": self.predictor.rank(modality, v, rank, k)}

    @api.post("/search")
    async def search(self, file: UploadFile | None = File(None), text: str = Form(""),
                     k: int | None = Form(None)):
        k = self._k(k)
        if self.gallery is None:
            raise RequestError("no_gallery", "this service was started without --gallery")
        if file is not None and file.filename:
            modality, v = await self._upload(file)
            query = file.filename
        elif text.strip():
            modality, query = "text", text.strip()
            v = (await asyncio.to_thread(self.predictor.model.embed_texts, [query]))[0]
        else:
            raise RequestError("no_query", "send a `file` or a `text`")
        return {"query": query, "modality": modality, "nearest": self.gallery.nearest(v, k)}

    @api.get("/media/{modality}/{media_id}")
    def media(self, modality: str, media_id: str):
        got = self.gallery.media(modality, media_id) if self.gallery else None
        if got is None:
            return JSONResponse({"error": "not_found", "message": f"no {modality} item {media_id}"},
                                status_code=404)
        data, fmt = got
        return Response(data, media_type=MEDIA_TYPES.get(fmt, "application/octet-stream"))


def prepare(cfg: ServeConfig) -> ServeConfig:
    """The checkpoint as a biovita folder (converted once from another layout) and the
    gallery embedded (once, on Ray Data, cached beside the store)."""
    if cfg.gallery:
        check_store(cfg.gallery).require(["audio", "image"], "a gallery")
    cfg = dataclasses.replace(cfg, checkpoint=resolve_checkpoint(cfg.checkpoint, clap=cfg.clap))
    if cfg.gallery:
        gallery_embeddings(cfg.gallery, cfg.checkpoint)
    return cfg


def build_app(cfg: ServeConfig):
    """The Ray Serve application (bind it with `serve.run`): replicas and autoscaling from
    cfg, which `prepare` made ready."""
    options = {"ray_actor_options": {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
               "max_ongoing_requests": cfg.max_ongoing_requests,
               "max_queued_requests": cfg.max_queued_requests,
               "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s)}
    if cfg.autoscaling.max_replicas > 1:
        a = cfg.autoscaling
        options["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                         "target_ongoing_requests": a.target_ongoing_requests}
    else:
        options["num_replicas"] = cfg.replicas
    return BioVITAService.options(**options).bind(cfg)


def start(cfg: ServeConfig, blocking: bool = False) -> str:
    """Build the gallery (once, on Ray Data), start Serve on cfg.host:cfg.port and deploy;
    returns the URL."""
    init_ray()
    cfg = prepare(cfg)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name="biovita", route_prefix="/", blocking=blocking)
    return f"http://{cfg.host}:{cfg.port}/"


def app_builder(args: dict):
    """Serve's application builder (`import_path: biovita.serve.app:app_builder` in a Serve
    config or a KubeRay RayService): `args` are ServeConfig keys."""
    return build_app(prepare(build(ServeConfig, dict(args))))
