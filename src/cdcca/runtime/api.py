"""The device as a service: an OpenAI-compatible HTTP API over one device state dir.

``POST /v1/chat/completions`` takes a user message with an ``image_url`` part (a ``data:`` URL, or a
local path inside ``--allow-files``) and a text question, and answers with a normal chat completion
whose content is the device's answer; the ``cdcca`` field adds its confidence, whether the request
was queued for upload and the adapter version that answered. Every request takes the path of
``cdcca device serve``: answer, UTS score, durable outbox. Requests that arrive together are answered
as one batch (one model, loaded once); an update applied by another process is followed before the
next batch. Bad input gets an OpenAI-style JSON error with the right status, never a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from cdcca.data.jsonl import IMAGE_SIZE, MAX_TEXT

MAX_IMAGE_BYTES = 4 * 1024 * 1024          # an image's encoded bytes
MAX_BODY_BYTES = 6 * 1024 * 1024           # the whole request (base64 inflates by 4/3)
MAX_PIXELS = 4096 * 4096                   # decoded size: refuses decompression bombs
MODEL_ID = "cdcca-device"


class APIError(Exception):
    """A request the device cannot answer: HTTP status, machine-readable code, one-line message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# -- the OpenAI request shape (the parts a VQA device uses; unknown fields are ignored) -------
class ImageURL(BaseModel):
    url: str = Field(max_length=MAX_BODY_BYTES)
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = Field(default=None, max_length=100_000)
    image_url: ImageURL | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=100_000)] | Annotated[list[ContentPart], Field(max_length=64)] | None = None


class ChatRequest(BaseModel):
    model: str | None = Field(default=None, max_length=200)
    messages: list[Message] = Field(min_length=1, max_length=64)
    stream: bool = False


@dataclass
class Query:
    image: np.ndarray            # uint8 (IMAGE_SIZE, IMAGE_SIZE, 3)
    question: str


def parse_query(req: ChatRequest, allow_files: Path | None) -> Query:
    """The image and question of the last user message, validated."""
    if req.stream:
        raise APIError(400, "stream_unsupported", "streaming is not supported; send stream=false")
    user = [m for m in req.messages if m.role == "user"]
    if not user:
        raise APIError(400, "no_user_message", "no user message: send one with an image_url part and a question")
    content = user[-1].content
    parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else (content or [])
    question = " ".join(p.text.strip() for p in parts if p.type == "text" and p.text and p.text.strip())
    images = [p.image_url for p in parts if p.type == "image_url"]
    if not question:
        raise APIError(400, "no_question", "the user message has no question text")
    if len(question) > MAX_TEXT:
        raise APIError(413, "text_too_long", f"the question has {len(question)} characters; the limit is {MAX_TEXT}")
    if len(images) != 1 or images[0] is None:
        raise APIError(400, "need_one_image", f"send exactly one image_url part (got {len(images)})")
    return Query(decode_image(image_bytes(images[0].url, allow_files)), question)


def image_bytes(url: str, allow_files: Path | None) -> bytes:
    """The encoded image behind an image_url: a data: URL, or a file inside ``allow_files``."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise APIError(400, "bad_data_url", "a data: URL must look like data:image/png;base64,<payload>")
        if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
            raise APIError(413, "image_too_large", f"the image is larger than the {MAX_IMAGE_BYTES // 2**20} MiB limit")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "bad_base64", "the data: URL's payload is not valid base64") from None
    if url.startswith(("http://", "https://")):
        raise APIError(400, "remote_url", "the device does not fetch remote URLs; send the image as a data: URL")
    if allow_files is None:
        raise APIError(403, "files_not_allowed", "local paths are refused; start the API with --allow-files DIR "
                                                 "or send a data: URL")
    path = Path(url.removeprefix("file://")).expanduser()
    try:
        resolved = (path if path.is_absolute() else allow_files / path).resolve()
    except (OSError, RuntimeError, ValueError):
        raise APIError(400, "bad_path", "the image path cannot be resolved") from None
    if not resolved.is_relative_to(allow_files):
        raise APIError(403, "path_outside_allowed", f"the image path is outside the allowed folder {allow_files}")
    if not resolved.is_file():
        raise APIError(400, "no_such_file", f"no image file at {url!r} inside {allow_files}")
    if resolved.stat().st_size > MAX_IMAGE_BYTES:
        raise APIError(413, "image_too_large", f"the image is larger than the {MAX_IMAGE_BYTES // 2**20} MiB limit")
    return resolved.read_bytes()


def decode_image(data: bytes) -> np.ndarray:
    """RGB uint8 at the device's input size, or a 400/413 naming why not."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_IMAGE_BYTES:
        raise APIError(413, "image_too_large", f"the image is larger than the {MAX_IMAGE_BYTES // 2**20} MiB limit")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise APIError(413, "image_too_large", f"the image has {im.width}x{im.height} pixels; the limit is "
                                                       f"{MAX_PIXELS} pixels")
            return np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        raise APIError(400, "not_an_image", "the image_url does not hold a readable image (PNG, JPEG, …)") from None


# -- the model side ---------------------------------------------------------------------------
class DeviceService:
    """One device runtime answering batches under a lock (one model, loaded once); answering itself —
    tokens, answers, UTS, outbox — is the runtime's (:meth:`DeviceRuntime.answer_images`)."""

    def __init__(self, state_dir: Path):
        from cdcca.runtime.device import DeviceRuntime  # torch: the app's schema and errors load without it

        self.runtime = DeviceRuntime.open(state_dir)
        self.lock = threading.Lock()
        self.runtime.warm_up()                 # load and run everything now, not on the first request

    def answer(self, queries: list[Query]) -> list[dict]:
        with self.lock:
            self.runtime.follow_store()           # an update applied by the ClientApp lands between two batches
            return self.runtime.serve(np.stack([q.image for q in queries]), [q.question for q in queries])

    def close(self) -> None:
        self.runtime.close()


class Batcher:
    """Collects requests that arrive together (up to ``max_batch``, waiting at most ``max_wait_s``
    after the first) and answers them in one model call off the event loop."""

    def __init__(self, service: DeviceService, max_batch: int = 16, max_wait_s: float = 0.01):
        from concurrent.futures import ThreadPoolExecutor

        self.service, self.max_batch, self.max_wait_s = service, max_batch, max_wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batches = 0
        # one long-lived model thread: torch's intra-op thread pool is set up once, not per worker thread
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdcca-model")

    async def submit(self, query: Query) -> dict:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((query, fut))
        return await fut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            try:
                results = await loop.run_in_executor(self.pool, self.service.answer, [q for q, _ in batch])
            except Exception as exc:                        # the model failed: every waiter hears it
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error"
                                                               if status < 500 else "server_error", "code": code}})


def create_app(state_dir: Path, allow_files: Path | None = None, max_batch: int = 16, max_wait_s: float = 0.01) -> FastAPI:
    """The FastAPI app serving one device state dir."""
    allow = allow_files.resolve() if allow_files else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = DeviceService(Path(state_dir))
        app.state.service, app.state.batcher = service, Batcher(service, max_batch, max_wait_s)
        task = asyncio.create_task(app.state.batcher.run())
        try:
            yield
        finally:
            task.cancel()
            app.state.batcher.pool.shutdown(wait=True)
            service.close()

    app = FastAPI(title="cdcca device", version="1", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_req: Request, exc: APIError):
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_req: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(422, "invalid_body", f"malformed request body at {where or 'body'}: {first.get('msg', 'invalid')}")

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
            return _error(413, "body_too_large", f"the request body is over the {MAX_BODY_BYTES // 2**20} MiB limit")
        return await call_next(request)

    @app.get("/healthz")
    async def healthz() -> dict:
        rt = app.state.service.runtime
        return {"status": "ok", "device_id": rt.device_id, "adapter_version": rt.store.version}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "cdcca"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> dict:
        query = parse_query(req, allow)
        res = await app.state.batcher.submit(query)
        return {"id": f"chatcmpl-{res['sample_id']}", "object": "chat.completion", "created": int(time.time()),
                "model": MODEL_ID,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res["answer"]},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1},
                "cdcca": {k: res[k] for k in ("confidence", "queued_for_upload", "adapter_version", "sample_id",
                                              "direct_answer")}}

    return app
