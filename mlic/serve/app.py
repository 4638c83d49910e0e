"""Routes, limits and errors of the HTTP service, and the server that runs it.

``POST /v1/predict`` takes images as multipart file fields (any field name; ``file`` by convention) and
optional ``threshold``, ``top_k`` and ``attention`` fields (or query parameters); ``GET /v1/model``
describes the model; ``GET /healthz`` answers without a key; ``GET /`` is the web page.

Every refusal is JSON ``{"error": "<one line>"}`` with its status: 401 missing or wrong API key, 421 a Host
header that is not this machine's when no API key is set (DNS rebinding), 413 a body over the upload limit,
415 a file that is not in one of the formats mlic reads, 400 a corrupt or truncated image, one over the
pixel limit (decompression bombs included), an empty request, too many files or a bad field, 408 a body
that does not arrive in time, 503 while the request bodies held reach their memory budget. The service only
reads what is uploaded; it never fetches a URL.

Memory is bounded by the limits, whatever is uploaded: request bodies held at once by ``max_inflight_mb``,
decoding by ``decode_workers`` x :data:`DECODE_BYTES_PER_PIXEL` x ``max_pixels`` (decodes run in a pool of
``decode_workers`` threads; the rest wait), connections by ``max_connections``. :func:`run` binds the socket
and runs uvicorn with :func:`guard_connections`, which closes connections that send no request head in time
and, at the cap, the longest-idle one, so that idle connections never keep a request (or /healthz) out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import hmac
import ipaddress
import math
import resource
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mlic import __version__
from mlic.data.images import FormatError, ImageError, load_reduced
from mlic.engine.predict import Predictor
from mlic.errors import MlicError
from mlic.serve.batcher import DynamicBatcher

STATIC = Path(__file__).parent / "static"

DECODE_BYTES_PER_PIXEL = 17
"""Peak memory of one decode, in bytes per pixel of the file, rounded up from the worst measured for the formats
mlic reads at 25 MP (docs/deploy.md): WebP 16.1 (PIL holds libwebp's canvas, the frame's bytes and the image at
once), RGBA PNG and TIFF and progressive CMYK JPEG 8, RGB PNG 4, large JPEGs less (reduced-scale decoding)."""

TRIM_PIXELS = 2_000_000
"""After decoding a file of at least this many pixels, free heap pages go back to the OS (glibc keeps them
otherwise, per thread arena: the red team saw 6.9 GB stay resident)."""

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
FILES_BESIDES_CONNECTIONS = 128
"""Open files the process needs beside its connections (libraries, spooled uploads, the listening socket)."""


@dataclass
class ServeConfig:
    """Settings of one service (the ``mlic serve`` options)."""

    max_batch: int = 32
    """Most images per forward pass; 1 turns server-side batching off."""
    max_wait_ms: float = 5.0
    """How long a request waits for others to share its forward pass."""
    max_upload_mb: float = 20.0
    """Largest request body, in MB (413 above)."""
    max_pixels: int = 25_000_000
    """Largest image, in pixels (width x height), checked on the header before decoding (400 above): a
    6000 x 4000 (24 MP) photo passes; times :data:`DECODE_BYTES_PER_PIXEL`, one decode's peak memory (405 MB)."""
    max_files: int = 16
    """Most images per request (400 above)."""
    decode_workers: int = 2
    """Images decoded at once (a thread pool); the others wait their turn, holding only their bytes."""
    max_inflight_mb: float = 128.0
    """Most MB of request bodies held at once across all requests (503 above, until some finish)."""
    max_connections: int = 1000
    """Most open connections; a new one beyond closes the longest-idle one (none idle: the new one)."""
    timeout_header: float = 10.0
    """Seconds a connection has to send a complete request head, from opening or from its last response."""
    timeout_keep_alive: float = 5.0
    """Seconds an idle keep-alive connection stays open after a response (uvicorn's timer)."""
    timeout_body: float = 120.0
    """Seconds a request body has to arrive in full, from its head (408 after)."""
    api_key: str | None = None
    """When set, every /v1/ route needs ``Authorization: Bearer <key>`` (401 otherwise)."""
    host: str = "127.0.0.1"
    """The address bound; without an API key, Host headers must name it, localhost or an IP address (421)."""
    allow_hosts: list[str] = field(default_factory=list)
    """More host names accepted in the Host header when no API key is set (names this machine is reached by)."""

    def check(self) -> None:
        """Refuse impossible settings in one line naming the option (``MlicError``)."""
        positive = {"--max-batch": self.max_batch, "--max-upload-mb": self.max_upload_mb,
                    "--max-pixels": self.max_pixels, "--max-files": self.max_files,
                    "--decode-workers": self.decode_workers, "--max-inflight-mb": self.max_inflight_mb,
                    "--max-connections": self.max_connections, "--timeout-header": self.timeout_header,
                    "--timeout-keep-alive": self.timeout_keep_alive, "--timeout-body": self.timeout_body}
        for option, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise MlicError(f"{option} {value:g}: give a number above 0")
        for option, value in (("--max-batch", self.max_batch), ("--max-pixels", self.max_pixels),
                              ("--max-files", self.max_files), ("--decode-workers", self.decode_workers),
                              ("--max-connections", self.max_connections)):
            if value != int(value):
                raise MlicError(f"{option} {value:g}: give a whole number")
        if not (math.isfinite(self.max_wait_ms) and self.max_wait_ms >= 0):
            raise MlicError(f"--max-wait-ms {self.max_wait_ms:g}: give 0 or more milliseconds")
        if self.max_inflight_mb < self.max_upload_mb:
            raise MlicError(f"--max-inflight-mb {self.max_inflight_mb:g} is below --max-upload-mb "
                            f"{self.max_upload_mb:g}: no request of the largest size could ever be read; raise it")

    def worst_case_mb(self) -> float:
        """The memory, in MB, that requests can make the service hold above its idle size: the bodies held, and
        each decode's pixels plus the copy of its file it reads."""
        per_decode = DECODE_BYTES_PER_PIXEL * self.max_pixels / 2**20 + self.max_upload_mb
        return self.max_inflight_mb + self.decode_workers * per_decode


class RequestError(Exception):
    """A refused request: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: musl and macOS return freed memory without being asked)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()


def decode_upload(data: bytes, name: str, transform, max_pixels: int, img_size: int) -> torch.Tensor:
    """Uploaded bytes -> uint8 (3, S, S), refusing other formats (415), oversized and corrupt images (400).

    Decodes with :func:`mlic.data.images.load_reduced` (the pixel limit on the header, reduced-scale and
    box-reduced decoding) and hands the heap's free pages back after a large file.
    """
    if not data:
        raise RequestError(400, f"{name}: empty file")
    try:
        image, pixels = load_reduced(name, getattr(transform, "decode_size", img_size), max_pixels, data=data)
    except FormatError as e:
        raise RequestError(415, str(e)) from None
    except ImageError as e:
        raise RequestError(400, str(e)) from None
    tensor = transform(image)
    del image
    if pixels >= TRIM_PIXELS and MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
    return tensor


def host_allowed(host_header: bytes, config: ServeConfig) -> bool:
    """Whether a Host header names this service: an IP address (a DNS rebinding attack needs a name it
    controls), localhost, the bound host or one of ``allow_hosts``. No header (HTTP/1.0) passes."""
    if not host_header:
        return True
    host = host_header.decode("latin-1").strip().lower()
    if host.startswith("["):  # [v6] or [v6]:port, nothing else
        end = host.find("]")
        rest = host[end + 1:]
        if end < 0 or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return False
        host = host[1:end]
    elif host.count(":") == 1:
        host, port = host.split(":")
        if not port.isdigit():
            return False
    host = host.rstrip(".")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return True
    return host in {"localhost", config.host.lower(), *(h.lower() for h in config.allow_hosts)}


class Guard:
    """ASGI middleware, before anything is parsed: the Host header (421) when no API key is set, the API key on
    /v1/ routes (401), the body limit (413), the deadline of the body (408) and the budget of bodies held (503).

    A declared Content-Length over the limit is refused at once; a chunked body is counted as it is read and
    refused when it passes the limit. Every body byte read counts toward ``max_inflight_mb`` until its request
    has been answered.
    """

    def __init__(self, app, config: ServeConfig) -> None:
        self.app = app
        self.config = config
        self.expected = f"Bearer {config.api_key}".encode() if config.api_key else None
        self.max_body = int(config.max_upload_mb * 1024 * 1024)
        self.budget = int(config.max_inflight_mb * 1024 * 1024)
        self.inflight = 0
        self.too_big = f"request body over the upload limit of {config.max_upload_mb:g} MB"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if not self.expected and not host_allowed(headers.get(b"host", b""), self.config):
            host = headers[b"host"].decode("latin-1")
            port = (scope.get("server") or ("", 8000))[1]
            message = (f"Host {host!r} refused: without an API key this service answers only to localhost, IP "
                       f"addresses and --host {self.config.host} (DNS rebinding); open http://127.0.0.1:{port}/, "
                       f"or start mlic serve with --api-key, or with --allow-host {host.rsplit(':', 1)[0]}")
            return await JSONResponse({"error": message}, status_code=421)(scope, receive, send)
        if self.expected and scope["path"].startswith("/v1/"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                response = JSONResponse({"error": "missing or wrong API key: send 'Authorization: Bearer <key>'"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            return await JSONResponse({"error": self.too_big}, status_code=413)(scope, receive, send)
        received = 0
        done = False
        deadline = asyncio.get_running_loop().time() + self.config.timeout_body

        async def counted():
            nonlocal received, done
            if done:  # the body is in: a later receive() only waits for the client to go
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                raise RequestError(408, f"request body not received within {self.config.timeout_body:g} s "
                                        "(--timeout-body)") from None
            size = len(message.get("body", b""))
            received += size
            self.inflight += size
            done = message["type"] != "http.request" or not message.get("more_body", False)
            if received > self.max_body:
                raise RequestError(413, self.too_big)
            if self.inflight > self.budget:
                raise RequestError(503, f"busy: request bodies in progress fill the {self.config.max_inflight_mb:g}"
                                        " MB budget (--max-inflight-mb); retry shortly")
            return message

        try:
            return await self.app(scope, counted, send)
        finally:
            self.inflight -= received


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
    config.check()
    batcher = DynamicBatcher(predictor.scores, config.max_batch, config.max_wait_ms)
    decoder = ThreadPoolExecutor(max_workers=config.decode_workers, thread_name_prefix="mlic-decode")

    def read_and_decode(upload, name: str) -> torch.Tensor:
        upload.file.seek(0)  # read here, in the pool: a waiting upload holds no second copy of its bytes
        return decode_upload(upload.file.read(), name, predictor.transform, config.max_pixels, predictor.img_size)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()
        decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="mlic", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.batcher = batcher
    app.state.config = config

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status,
                            headers={"Retry-After": "1"} if status == 503 else None)

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
        hidden = ("api_key", "host", "allow_hosts")
        return {"classes": predictor.classes, "thresholds": predictor.thresholds.tolist(),
                "img_size": predictor.img_size, "head": predictor.engine.head,
                "backbone": config_dict.get("backbone", meta.get("backbone", "")), "engine": predictor.engine.name,
                "attention": predictor.has_attention, "mlic_version": __version__,
                "model_version": meta.get("mlic_version", ""),
                "limits": {k: v for k, v in asdict(config).items() if k not in hidden},
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
        try:
            uploads = [(key, v) for key, v in form.multi_items() if hasattr(v, "read")]
            fields = {key: v for key, v in form.multi_items() if isinstance(v, str)}
            threshold, top_k, attention = parse_options(fields, dict(request.query_params))
            if not uploads:
                raise RequestError(400, "no image in the request: send one or more files as multipart field 'file'")
            names = [upload.filename or key for key, upload in uploads]
            loop = asyncio.get_running_loop()
            decoded = await asyncio.gather(*(loop.run_in_executor(decoder, read_and_decode, upload, name)
                                             for (_, upload), name in zip(uploads, names)), return_exceptions=True)
        finally:
            await form.close()
        for outcome in decoded:  # the first bad file in request order
            if isinstance(outcome, BaseException):
                raise outcome
        images = torch.stack(decoded)
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

    app.add_middleware(Guard, config=config)
    return app


class ConnectionLimits:
    """What every connection of one server shares: the cap, the header timeout, and which connections wait for
    a request head (oldest first): those are the ones closed when the cap is reached."""

    def __init__(self, max_connections: int, timeout_header: float) -> None:
        self.max_connections = max_connections
        self.timeout_header = timeout_header
        self.open: set = set()
        self.idle: collections.OrderedDict = collections.OrderedDict()


def guard_connections(base: type, limits: ConnectionLimits) -> type:
    """A subclass of uvicorn's HTTP protocol ``base`` (h11 or httptools) that enforces ``limits``.

    A connection is idle from its opening, and again from each response, until a complete request head has
    arrived; an idle connection is closed ``timeout_header`` seconds after it became idle, however it trickles
    bytes. When a new connection takes the count over ``max_connections``, the longest-idle one is closed
    (with none idle, the new one), so idle connections can fill the cap but never keep a request out.
    uvicorn's own keep-alive timer still closes a connection idle after a response sooner.
    """

    class GuardedProtocol(base):
        _timer = None

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _busy(self) -> None:
            limits.idle.pop(self, None)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _idle(self) -> None:
            self._busy()
            limits.idle[self] = None
            self._timer = self.loop.call_later(limits.timeout_header, self._header_timeout)

        def _header_timeout(self) -> None:
            self._timer = None
            self._busy()
            if not self._in_request():  # (a pipelined request may have started without new data)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            limits.open.add(self)
            self._idle()
            if len(limits.open) > limits.max_connections:
                victim = next((c for c in limits.idle if c is not self and not c._in_request()), self)
                victim._busy()
                limits.open.discard(victim)
                victim.transport.abort()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_request():
                self._busy()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self._in_request():
                self._idle()

        def connection_lost(self, exc) -> None:
            self._busy()
            limits.open.discard(self)
            super().connection_lost(exc)

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def raise_open_file_limit() -> int:
    """Raise the soft limit of open files to the hard one (where allowed); returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        for limit in (target, 1 << 20, 10240):  # Linux caps at fs.nr_open, macOS at OPEN_MAX
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, target), hard))
                break
            except (ValueError, OSError):
                continue
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port); an OSError names the address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise MlicError(f"--host {host}: cannot bind it ({e.strerror or e}); give an address of this machine, "
                        "e.g. 127.0.0.1") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise MlicError(f"--host {host} --port {port}: cannot bind ({e.strerror or e}); pick another port, or stop "
                        "what holds it") from None
    sock.listen(2048)
    return sock


def run(app, config: ServeConfig, sock: socket.socket) -> None:
    """Serve ``app`` on the bound ``sock`` with uvicorn (its HTTP protocol wrapped in :func:`guard_connections`)
    until interrupted."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    limits = ConnectionLimits(config.max_connections, config.timeout_header)
    uv_config = uvicorn.Config(app, http=guard_connections(AutoHTTPProtocol, limits), log_level="warning",
                               timeout_keep_alive=config.timeout_keep_alive)
    uvicorn.Server(uv_config).run(sockets=[sock])
