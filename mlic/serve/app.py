"""Routes, limits and errors of the HTTP service.

``POST /v1/predict`` takes images as multipart file fields (any field name; ``file`` by convention) and
optional ``threshold``, ``top_k`` and ``attention`` fields (or query parameters); ``GET /v1/model``
describes the model; ``GET /healthz`` answers without a key; ``GET /`` is the web page.

Every refusal is JSON ``{"error": "<one line>"}`` with its status: 401 missing or wrong API key, 413 a
body over the upload limit, 415 a file that is not an image, 400 a corrupt or truncated image, one over
the pixel limit (decompression bombs included), an empty request, too many files or a bad field. The
service only reads what is uploaded; it never fetches a URL.
"""

from __future__ import annotations

import contextlib
import hmac
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mlic import __version__
from mlic.data.images import ImageError, load_image
from mlic.engine.predict import Predictor
from mlic.serve.batcher import DynamicBatcher

STATIC = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    """Settings of one service (the ``mlic serve`` options)."""

    max_batch: int = 32
    """Most images per forward pass; 1 turns server-side batching off."""
    max_wait_ms: float = 5.0
    """How long a request waits for others to share its forward pass."""
    max_upload_mb: float = 20.0
    """Largest request body, in MB (413 above)."""
    max_pixels: int = 40_000_000
    """Largest image, in pixels (width x height), before decoding (400 above)."""
    max_files: int = 16
    """Most images per request (400 above)."""
    api_key: str | None = None
    """When set, every /v1/ route needs ``Authorization: Bearer <key>`` (401 otherwise)."""


class RequestError(Exception):
    """A refused request: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_upload(data: bytes, name: str, transform, max_pixels: int, img_size: int) -> torch.Tensor:
    """Uploaded bytes -> uint8 (3, S, S), refusing non-images (415), oversized and corrupt ones (400)."""
    if not data:
        raise RequestError(400, f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
    except UnidentifiedImageError:
        raise RequestError(415, f"{name}: not an image mlic can read (JPEG, PNG, WebP, BMP, GIF, TIFF)") from None
    except Image.DecompressionBombError:
        raise RequestError(400, f"{name}: refused, too many pixels (decompression bomb)") from None
    except Exception as e:  # noqa: BLE001 - a corrupt header can make a PIL plugin raise anything
        raise RequestError(400, f"{name}: corrupt image header ({type(e).__name__})") from None
    if width * height > max_pixels:
        raise RequestError(400, f"{name}: {width}x{height} is {width * height} pixels, over the limit of "
                                f"{max_pixels}")
    try:
        image = load_image(io.BytesIO(data), img_size)
    except ImageError as e:
        reason = str(e).split(": ", 1)[-1]  # the message names a BytesIO; name the upload instead
        raise RequestError(400, f"{name}: {reason}") from None
    return transform(image)


class Guard:
    """ASGI middleware: the API key on /v1/ routes (401), and the body limit (413) before anything is parsed.

    A declared Content-Length over the limit is refused at once; a chunked body is counted as it is read
    and refused when it passes the limit.
    """

    def __init__(self, app, api_key: str | None, max_body: int, max_upload_mb: float) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body = max_body
        self.too_big = f"request body over the upload limit of {max_upload_mb:g} MB"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected and scope["path"].startswith("/v1/"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                response = JSONResponse({"error": "missing or wrong API key: send 'Authorization: Bearer <key>'"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            return await JSONResponse({"error": self.too_big}, status_code=413)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise RequestError(413, self.too_big)
            return message

        return await self.app(scope, counted, send)


def parse_options(fields: dict, query: dict) -> tuple[float | None, int | None, bool]:
    """threshold (0..1), top_k (>= 1) and attention (bool) from form fields or query parameters."""
    def get(key):
        return fields.get(key, query.get(key))

    threshold = top_k = None
    try:
        if get("threshold") not in (None, ""):
            threshold = float(get("threshold"))
            if not 0.0 <= threshold <= 1.0:
                raise ValueError
    except ValueError:
        raise RequestError(400, f"threshold {get('threshold')!r}: give a number from 0 to 1") from None
    try:
        if get("top_k") not in (None, ""):
            top_k = int(get("top_k"))
            if top_k < 1:
                raise ValueError
    except ValueError:
        raise RequestError(400, f"top_k {get('top_k')!r}: give a whole number of at least 1") from None
    attention = str(get("attention") or "").lower() in ("1", "true", "yes", "on")
    return threshold, top_k, attention


def create_app(predictor: Predictor, config: ServeConfig | None = None):
    """The FastAPI application serving ``predictor`` under ``config``."""
    config = config or ServeConfig()
    batcher = DynamicBatcher(predictor.scores, config.max_batch, config.max_wait_ms)
    max_body = int(config.max_upload_mb * 1024 * 1024)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="mlic", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.batcher = batcher
    app.state.config = config

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        return error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # never a traceback in a response
        return error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    def describe() -> dict:
        meta = predictor.meta
        config_dict = meta.get("model") or {}
        return {"classes": predictor.classes, "thresholds": predictor.thresholds.tolist(),
                "img_size": predictor.img_size, "head": predictor.engine.head,
                "backbone": config_dict.get("backbone", meta.get("backbone", "")), "engine": predictor.engine.name,
                "attention": predictor.has_attention, "mlic_version": __version__,
                "model_version": meta.get("mlic_version", ""),
                "limits": {k: v for k, v in asdict(config).items() if k != "api_key"},
                "served": {"images": batcher.images, "forward_passes": batcher.batches}}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model_info():
        return describe()

    @app.post("/v1/predict")
    async def predict(request: Request):
        try:
            form = await request.form(max_files=config.max_files, max_fields=16)
        except RequestError:
            raise
        except HTTPException as e:
            detail = str(e.detail)
            if "Too many files" in detail:
                raise RequestError(400, f"too many files: at most {config.max_files} images per request") from None
            raise RequestError(400, f"cannot read the multipart body ({detail})") from None
        except Exception:  # noqa: BLE001 - any parser failure is the client's body
            raise RequestError(400, "cannot read the body: send the images as multipart/form-data file fields")
        uploads = [(key, v) for key, v in form.multi_items() if hasattr(v, "read")]
        fields = {key: v for key, v in form.multi_items() if isinstance(v, str)}
        threshold, top_k, attention = parse_options(fields, dict(request.query_params))
        if not uploads:
            raise RequestError(400, "no image in the request: send one or more files as multipart field 'file'")
        names, tensors = [], []
        for key, upload in uploads:
            name = upload.filename or key
            data = await upload.read()
            tensors.append(await run_in_threadpool(decode_upload, data, name, predictor.transform,
                                                   config.max_pixels, predictor.img_size))
            names.append(name)
        images = torch.stack(tensors)
        scores = await batcher.submit(images)
        maps = None
        if attention and predictor.has_attention:
            _, maps = await run_in_threadpool(predictor.engine.attention, images)
        results = []
        for i, (name, s) in enumerate(zip(names, scores)):
            labels = predictor.labels(s, threshold, top_k)
            row = {"file": name, "labels": [{"label": c, "score": round(v, 6)} for c, v in labels],
                   "scores": {c: round(float(v), 6) for c, v in zip(predictor.classes, s)}}
            if maps is not None:
                shown = [predictor.classes.index(c) for c, _ in labels] or list(np.argsort(-s)[:3])
                row["attention"] = {predictor.classes[k]: np.round(maps[i, k], 5).tolist() for k in shown[:12]}
            results.append(row)
        return {"results": results}

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    app.add_middleware(Guard, api_key=config.api_key, max_body=max_body, max_upload_mb=config.max_upload_mb)
    return app

