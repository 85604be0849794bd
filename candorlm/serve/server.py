"""`candor serve`: the HTTP server around the engine (FastAPI + uvicorn): the app factory, its
state, the middleware (request ids, bearer-key auth on /v1, the body-size limit), the error
format, and the routes other than the OpenAI generation endpoints (serve/openai_api.py):
/v1/models, /health, /version, /metrics, /tokenize, /detokenize, /v1/feedback/*, and the web
chat at / (serve/web/). It generates nothing itself.

Errors are OpenAI's nested body `{"error": {"message", "type", "param", "code"}}` (vLLM's from
v0.10.1) for every status: validation 400, auth 401, unknown route or model 404, body too large
413, over the concurrency limit 429, model still loading 503. The model loads after the port is
bound, so /health answers 503 until it is ready (as vLLM's does), and 200 after.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from candorlm.errors import CandorError
from candorlm.serve.protocol import (
    ApiError,
    DetokenizeRequest,
    Preference,
    Rating,
    TokenizeRequest,
    chat_messages,
    error_body,
)

log = logging.getLogger("candorlm.serve")
WEB = Path(__file__).parent / "web"
# The chat page may load only its own files and talk only to this server: even a bug that put
# model output into the page as HTML could run no script (the page inserts it as text).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass
class ServeOptions:
    """What `candor serve` takes besides the model; the engine's settings are `engine`."""

    served_name: str | None = None  # default: the model directory as given (vLLM's default)
    api_key: str | None = None
    max_concurrency: int = 64  # requests held at once, running or queued in the engine; the next is a 429
    max_body_bytes: int = 4 << 20
    run_dir: str | Path = "runs/serve"  # where feedback.db lives
    engine: dict = field(default_factory=dict)  # Engine(...) keyword arguments


def model_version(model_dir: Path) -> str:
    """The model's identity for feedback: sha256 of its weights file (first 16 hex digits)."""
    h = hashlib.sha256()
    with open(model_dir / "model.safetensors", "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


class ServerState:
    """The loaded model and engine, and the server's counters; `ready` once loading finished."""

    def __init__(self, model_dir: str | Path, options: ServeOptions):
        from candorlm.serve.feedback import open_store

        self.model_dir, self.opt = Path(model_dir), options
        self.name = options.served_name or str(model_dir)
        self.model = self.engine = self.metrics = self.version = None
        self.max_model_len = 0
        self.error: str | None = None  # why loading failed
        self.loaded = threading.Event()
        self.in_flight = 0
        self.feedback = open_store(options.run_dir)

    def load(self, run: bool = True) -> None:
        """Load the model, then (run=True) step the engine in this same thread until stop(): the
        thread that loaded the model runs every PyTorch operation of the server, so PyTorch's
        OpenMP threads form one team (Engine.run says what two teams cost). The server calls
        this in a thread of its own, after the port is bound; the HTTP side runs no PyTorch."""
        from candorlm.api import load
        from candorlm.serve.engine import Engine
        from candorlm.serve.metrics import Metrics

        try:
            model = load(self.model_dir)
            self.version = model_version(self.model_dir)
            engine = Engine(model, **self.opt.engine)
            engine.warm()
            self.max_model_len = getattr(engine, "max_seq_len", None) or model.config.max_seq_len
            self.metrics = Metrics(self.name, self.max_model_len, engine.stats)
            self.model, self.engine = model, engine
        except Exception as e:  # a CandorError or a broken model directory: reported, not raised in a thread
            self.error = f"{e}" if isinstance(e, CandorError) else f"{type(e).__name__}: {e}"
            log.error("loading %s failed: %s", self.model_dir, self.error)
            return
        finally:
            self.loaded.set()
        if run:
            engine.run()
        else:
            engine.start()

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def check(self, model: str | None = None) -> None:
        """Raise unless the server can generate for `model` (None: the one it serves)."""
        if not self.ready:
            raise ApiError(503, self.error and f"the model failed to load: {self.error}" or "the model is loading")
        if model is not None and model != self.name:
            raise ApiError(404, f"The model `{model}` does not exist.", "model")

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()


def create_app(model_dir: str | Path, options: ServeOptions | None = None, load_now: bool = False) -> FastAPI:
    """The app; the model loads in a thread when the app starts (or here with load_now)."""
    from candorlm.serve.openai_api import router

    state = ServerState(model_dir, options or ServeOptions())

    async def lifespan(app):
        if not state.loaded.is_set():
            threading.Thread(target=state.load, name="candor-engine", daemon=True).start()
        yield
        state.stop()

    app = FastAPI(title="candorlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    if load_now:
        state.load(run=False)
    app.include_router(router)
    _error_handlers(app)
    _routes(app, state)
    app.add_middleware(Guard, state=state)
    return app


class ErrorResponse(JSONResponse):
    """An error body in ASCII: a message may quote the request, and what it quotes must not
    break the response."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True).encode()


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return ErrorResponse(error_body(e.status, e.message, e.param), status_code=e.status)

    @app.exception_handler(CandorError)
    async def candor_error(request, e: CandorError):
        return ErrorResponse(error_body(400, str(e)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            where, msg = "", f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
        return ErrorResponse(error_body(400, f"{where}: {msg}" if where else msg, where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return ErrorResponse(error_body(e.status_code, message.get(e.status_code, str(e.detail))),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return ErrorResponse(error_body(500, f"internal error: {type(e).__name__}"), status_code=500)


def _routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        if not state.ready:
            return ErrorResponse(error_body(503, state.error or "the model is loading"), status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        from importlib.metadata import PackageNotFoundError, version

        try:
            return {"version": version("candorlm")}
        except PackageNotFoundError:  # run from a source tree that was never installed
            return {"version": "unknown"}

    @app.get("/metrics")
    async def metrics():
        if not state.ready:
            return Response(b"", media_type="text/plain; version=0.0.4")
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        state.check()
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "candorlm", "root": str(state.model_dir),
                                            "max_model_len": state.max_model_len, "version": state.version,
                                            # the sampling defaults a request's missing fields take
                                            "generation_config": dataclasses.asdict(state.model.generation_config)}]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        state.check(name)
        return (await models())["data"][0]

    @app.post("/tokenize")
    def tokenize(req: TokenizeRequest):
        state.check(req.model)
        tok = state.model.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give either prompt or messages", "prompt")
        if req.messages is not None:
            ids = tok.render_chat(chat_messages(req.messages), add_generation_prompt=req.add_generation_prompt)
        else:
            ids = ([tok.bos_id] if req.add_special_tokens else []) + tok.encode(req.prompt)
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids,
                "token_strs": [tok.id_to_bytes(i).decode("utf-8", errors="replace") for i in ids]}

    @app.post("/detokenize")
    def detokenize(req: DetokenizeRequest):
        state.check(req.model)
        from candorlm.serve.protocol import check_token_ids

        check_token_ids(req.tokens, state.model.tokenizer.vocab_size, "tokens")
        return {"prompt": state.model.tokenizer.decode(req.tokens)}

    _feedback_routes(app, state)

    @app.get("/")
    async def index():
        return FileResponse(WEB / "index.html", headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    @app.get("/web/{name}")
    async def asset(name: str):
        types = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in types:
            raise ApiError(404, f"no route /web/{name}")
        return FileResponse(WEB / name, media_type=types[name], headers={"Cache-Control": "no-cache"})


def _feedback_routes(app: FastAPI, state: ServerState) -> None:
    # The answer's model version is the client's record of which model gave it (a conversation
    # may outlive a server); the serving model's when the client sent none.
    @app.post("/v1/feedback/rating")
    def rate(req: Rating):
        state.check()
        state.feedback.rate(req.conversation_id, req.answer_id, chat_messages(req.messages), req.answer,
                            req.rating, req.model_version or state.version)
        return {"ok": True}

    @app.post("/v1/feedback/preference")
    def prefer(req: Preference):
        state.check()
        state.feedback.prefer(req.conversation_id, chat_messages(req.messages), req.chosen,
                              req.rejected, req.model_version or state.version)
        return {"ok": True}


class Guard:
    """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the routes):
    X-Request-Id (echoed, or made), bearer-key auth on /v1 paths, and the body-size limit (413;
    a body without Content-Length is read here up to the limit and replayed)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", rid.encode("latin-1")))
            await send(message)

        key = self.state.opt.api_key
        if key and scope["path"].startswith("/v1"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return await _reply(send_with_id, 401, "Unauthorized: a valid API key is required "
                                    "(Authorization: Bearer KEY)")
        limit = self.state.opt.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                return await _reply(send_with_id, 413, f"the body is larger than the server's limit of {limit} bytes")
        elif scope["method"] in ("POST", "PUT", "PATCH"):
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    return await _reply(send_with_id, 413, f"the body is larger than the server's limit of {limit} "
                                        "bytes")
            receive = _replay(body, receive)
        await self.app(scope, receive, send_with_id)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _reply(send, status: int, message: str) -> None:
    data = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None,
          log_level: str = "warning") -> None:
    """Bind host:port (0: any free port), print the address, load the model, serve until
    Ctrl-C or SIGTERM. A model that fails to load stops the server with a CandorError."""
    # OpenMP's wait policy is libgomp's default (an idle thread spins a while, then sleeps) unless
    # the environment sets one. Interleaved runs of bench/serve.py (2 Zen4 cores with AVX512-BF16,
    # random cpu-tiny-shaped model, eager), one stream / 16 streams: OMP_WAIT_POLICY=PASSIVE (a
    # futex wake-up for every parallel region) 149-167 / 1,222-1,402 tok/s; GOMP_SPINCOUNT=20000
    # 158-178 / 1,764-2,182; the default 186-211 / 1,835-2,077.
    import socket

    import uvicorn

    if not (Path(model_dir) / "config.json").is_file():
        raise CandorError(f"{model_dir} is not a model directory (no config.json)")
    app = create_app(model_dir, options)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this (Linux): without it Nagle's algorithm holds each small SSE
    # chunk until the client's delayed ACK, ~40 ms, which was most of one stream's time to first token.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise CandorError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
    state: ServerState = app.state.serve

    def watch_load():
        state.loaded.wait()
        if state.error:
            server.should_exit = True
        else:
            print(f"ready: {state.name} (version {state.version}, {state.max_model_len}-token context)", flush=True)

    print(f"candor serve: listening on http://{host}:{bound} (the chat at /; the API at /v1)", flush=True)
    threading.Thread(target=watch_load, daemon=True).start()
    asyncio.run(server.serve(sockets=[sock]))
    if state.error:
        raise CandorError(f"the model failed to load: {state.error}")
