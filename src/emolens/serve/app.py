"""The HTTP server: OpenAI-compatible routes on FastAPI, SSE streaming, limits and the API key.

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (streamed or not), `GET /v1/models`,
`GET /health`, `GET /emolens/bank` (what the dashboard needs: emotions, layers, map) and the
dashboard at `/`. With an API key, every `/v1` and `/emolens` route needs
`Authorization: Bearer KEY`. Bodies over the limit get 413, too many concurrent requests 429,
bad requests 400 with a message naming the field.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from emolens.bank import EmotionBank
from emolens.chat import render
from emolens.errors import EmolensError
from emolens.guard import reference_scale
from emolens.models import LoadedModel
from emolens.readout import resolve_layer
from emolens.serve.lens import Lens
from emolens.serve.protocol import (
    Defaults,
    Limits,
    ParsedRequest,
    RequestError,
    chunk,
    completion,
    new_id,
    parse_request,
    usage,
)
from emolens.serve.scheduler import Job, Scheduler
from emolens.steer import MAX_STRENGTH, MODES

log = logging.getLogger("emolens")
STATIC = Path(__file__).parent / "static"
PROTECTED = ("/v1/", "/emolens/")


@dataclass(frozen=True)
class Settings:
    """How the server runs: read `layer` and `variant`, the API key (None: open), request
    defaults and limits."""

    layer: int | None = None
    variant: str = "denoised"
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    defaults: Defaults = field(default_factory=Defaults)


def create_app(lm: LoadedModel, bank: EmotionBank, settings: Settings = Settings()) -> FastAPI:
    """The server for `lm` and `bank` (computes the guard's reference scale first)."""
    layer = resolve_layer(lm, bank, settings.layer)
    lens = Lens(bank, layer, settings.variant, reference_scale(lm, bank, layer, settings.variant))
    scheduler = Scheduler(lm, lens)
    service = Service(lm, bank, lens, scheduler, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.close()

    app = FastAPI(title="emolens", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)  # fmt: skip
    app.state.service = service

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(RequestError(error.status_code, str(error.detail)).body(),
                            status_code=error.status_code)  # fmt: skip

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": lm.name,
            "auth": settings.api_key is not None,
            "active": scheduler.active,
            "steps": scheduler.steps,
            "peak_batch": scheduler.peak,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": lm.name, "object": "model", "created": 0, "owned_by": "emolens"}]}  # fmt: skip

    @app.get("/emolens/bank")
    async def bank_info() -> dict:
        return service.info()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await service.handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await service.handle(request, "completion")

    @app.get("/")
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Gate, api_key=settings.api_key, max_body=settings.limits.max_body)
    return app


class Service:
    """Requests to jobs and job events to responses."""

    def __init__(
        self, lm: LoadedModel, bank: EmotionBank, lens: Lens, scheduler: Scheduler,
        settings: Settings,
    ) -> None:  # fmt: skip
        self.lm, self.bank, self.lens, self.scheduler = lm, bank, lens, scheduler
        self.settings = settings

    def info(self) -> dict:
        """The bank as the dashboard needs it."""
        from emolens.concepts import showcase

        settings = self.settings
        return {
            "model": self.lm.name,
            "layer": self.lens.layer,
            "layers": self.bank.layers,
            "variant": self.lens.variant,
            "emotions": self.lens.emotions,
            "showcase": [e for e in showcase() if e in self.lens.emotions],
            "map": self.lens.map,
            "max_strength": None if settings.defaults.allow_strong else MAX_STRENGTH,
            "positions": list(MODES),
            "defaults": {
                "positions": settings.defaults.positions,
                "max_tokens": settings.defaults.sampling.max_new_tokens,
                "temperature": settings.defaults.sampling.temperature,
            },  # fmt: skip
            "limits": {
                "max_tokens": settings.limits.max_tokens,
                "max_messages": settings.limits.max_messages,
            },  # fmt: skip
        }

    async def handle(self, request: Request, kind: str) -> Any:
        settings = self.settings
        parsed = parse_request(await request.body(), kind, self.lm.name, self.bank,
                               settings.limits, settings.defaults)  # fmt: skip
        job, events = self._job(parsed)
        if not self.scheduler.submit(job, settings.limits.max_concurrent):
            raise RequestError(
                429, f"too many concurrent requests (at most {settings.limits.max_concurrent}); "
                "retry shortly", code="too_many_requests",
            )  # fmt: skip
        rid, created = new_id(kind), int(time.time())
        if parsed.stream:
            stream = self._stream(parsed, job, events, rid, created)
            return EventSourceResponse(stream, sep="\n", ping=15)
        return await self._whole(request, parsed, job, events, rid)

    def _job(self, parsed: ParsedRequest) -> tuple[Job, asyncio.Queue]:
        lm, bank, settings = self.lm, self.bank, self.settings
        try:
            if parsed.messages is not None:
                prompt = render(lm, parsed.messages, add_generation_prompt=True).ids
            else:
                assert parsed.prompt is not None
                prompt = render(lm, parsed.prompt).ids
        except EmolensError as error:
            raise RequestError(400, str(error)) from None
        sampling = parsed.sampling
        limit = lm.context_limit
        if limit:
            room = limit - len(prompt)
            if room < 1:
                raise RequestError(400, f"the prompt has {len(prompt)} tokens; {lm.name} reads "
                                   f"at most {limit}", "messages")  # fmt: skip
            if sampling.max_new_tokens > room:
                if parsed.max_tokens_given:
                    raise RequestError(
                        400, f"prompt ({len(prompt)} tokens) plus max_tokens "
                        f"({sampling.max_new_tokens}) exceeds the context of {limit}",
                        "max_tokens",
                    )  # fmt: skip
                sampling = type(sampling)(room, sampling.temperature, sampling.top_p,
                                          sampling.seed)  # fmt: skip
        variant, strong = self.lens.variant, settings.defaults.allow_strong
        layers = parsed.layers or [self.lens.layer]
        try:
            steering = (bank.steering(parsed.steer, layers, variant=variant, allow_strong=strong)
                        if parsed.steer else None)  # fmt: skip
        except EmolensError as error:
            raise RequestError(400, f"emolens.steer: {error}", "emolens.steer") from None
        guard_vector = (parsed.guard.steering(bank, layers, variant=variant, allow_strong=strong)
                        if parsed.guard is not None else None)  # fmt: skip
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: dict) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: nobody is listening
                pass

        job = Job(new_id("job"), prompt, sampling, emit, steering, parsed.positions,
                  parsed.reading, parsed.guard, guard_vector)  # fmt: skip
        return job, events

    async def _stream(
        self, parsed: ParsedRequest, job: Job, events: asyncio.Queue, rid: str, created: int
    ) -> AsyncIterator[str]:
        model, kind = self.lm.name, parsed.kind
        first, done = True, False
        try:
            while True:
                event = await events.get()
                if event["type"] == "error":
                    done = True
                    yield json.dumps(RequestError(500, event["message"]).body())
                    return
                if event["type"] == "token":
                    data = chunk(kind, rid, model, created, event["text"], None, first)
                    first = False
                    extra = dict(event.get("emolens") or {})
                    extra["index"] = event["index"]
                    if "guard" in event:
                        extra["guard"] = event["guard"]
                    if parsed.reading is not None or "guard" in event:
                        data["emolens"] = extra
                    yield json.dumps(data)
                    continue
                done = True
                data = chunk(kind, rid, model, created, None, event["finish"], first)
                if event["emolens"] is not None:
                    data["emolens"] = event["emolens"]
                yield json.dumps(data)
                if parsed.include_usage:
                    counts = usage(event["prompt_tokens"], event["completion_tokens"])
                    yield json.dumps({**chunk(kind, rid, model, created, None, None),
                                      "choices": [], "usage": counts})  # fmt: skip
                yield "[DONE]"
                return
        finally:
            if not done:
                self.scheduler.cancel(job.key)

    async def _whole(
        self, request: Request, parsed: ParsedRequest, job: Job, events: asyncio.Queue, rid: str
    ) -> JSONResponse:
        pieces, tokens = [], []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        self.scheduler.cancel(job.key)
                        return JSONResponse({}, status_code=499)
                    continue
                if event["type"] == "error":
                    raise RequestError(500, event["message"])
                if event["type"] == "token":
                    pieces.append(event["text"])
                    if parsed.reading is not None:
                        tokens.append({"index": event["index"], "text": event["text"],
                                       **event.get("emolens", {})})  # fmt: skip
                    continue
                body = completion(parsed.kind, rid, self.lm.name, "".join(pieces),
                                  event["finish"], (event["prompt_tokens"],
                                                    event["completion_tokens"]))  # fmt: skip
                if event["emolens"] is not None:
                    body["emolens"] = {**event["emolens"], "tokens": tokens}
                return JSONResponse(body)
        except asyncio.CancelledError:
            self.scheduler.cancel(job.key)
            raise


class Gate:
    """ASGI middleware: the API key on /v1 and /emolens routes, and the body size limit (the
    body is read here, bounded, and handed on)."""

    def __init__(self, app: Any, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(
        self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.api_key is not None and path.startswith(PROTECTED) and not self._authorised(scope):
            error = RequestError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")  # fmt: skip
            await _send_error(send, error)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = RequestError(413, f"the request body is over {self.max_body} bytes")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _send_error(send, too_big)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await _send_error(send, too_big)
                return
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorised(self, scope: dict) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        assert self.api_key is not None
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )


async def _send_error(send: Callable, error: RequestError) -> None:
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode())]  # fmt: skip
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
