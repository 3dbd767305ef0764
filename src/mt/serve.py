"""`mt serve`: a trained run behind HTTP, with FastAPI and uvicorn (the `serve` extra).

Requests that arrive together are decoded as one batch, as CTranslate2's and Marian's servers do: the
`Batcher` collects sentences until `max_batch_tokens` source tokens are waiting, or as many requests as it
expects (those it has just answered, whose clients are likely to send again, and those already waiting), or
until `max_wait_ms` have passed; then it decodes them in its own thread, so that the event loop keeps
answering (`/health` among others) while a batch decodes. A batch takes the waiting requests' sentences in
turn, one from each, so a long request is decoded a batch at a time beside the short ones that arrive meanwhile.

Every torch operation of the server runs in one thread, `on_model_thread`'s, the model's loading included.
torch's OpenMP gives each thread that runs parallel operations a team of worker threads of its own; once
two teams hold more threads than the machine has cores, libgomp's workers stop spin-waiting, and each small
operation of a decoding step then waits for its workers to wake.
"""

import asyncio
import contextlib
import logging
import math
import signal
import socket
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mt.errors import MtError

if TYPE_CHECKING:
    from mt.translate import Translation, Translator

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("serve.html")


@dataclass(frozen=True)
class Limits:
    """What one request may ask, and how requests are batched."""

    max_chars: int = 2000  # characters in one text
    max_texts: int = 1000  # texts in one request
    max_body_bytes: int = 4 << 20  # bytes of one request body
    max_beam: int = 16  # the widest beam a request may ask for
    max_batch_tokens: int = 4096  # source tokens decoded together
    max_wait_ms: float = 20.0  # how long a batch waits for the requests it expects


def require_extra():
    try:
        import fastapi
        import uvicorn
    except ImportError:
        raise MtError("mt serve needs FastAPI and uvicorn: pip install -e '.[serve]'") from None
    return fastapi, uvicorn


_model_thread: ThreadPoolExecutor | None = None


def on_model_thread(work: Callable[..., Any], *args, **kwargs) -> Any:
    """`work(*args, **kwargs)`, run in the one thread that runs the server's torch operations (see above);
    its result, or its exception, comes back to the caller."""
    global _model_thread
    if _model_thread is None:
        _model_thread = ThreadPoolExecutor(1, thread_name_prefix="mt-model")
    return _model_thread.submit(work, *args, **kwargs).result()


# Batching across requests


@dataclass(eq=False)
class _Request:
    texts: list[str]
    lengths: list[int]  # source tokens of each text
    settings: tuple[int | None, int]  # (beam size, nbest): only requests alike share a batch
    future: Future
    results: list[Any] = field(default_factory=list)
    taken: int = 0  # texts handed to a batch so far


class Batcher:
    """Decodes the texts of many requests in shared batches, formed in a thread of its own, on the model thread.

    Only requests with the same settings (beam size, nbest) share a batch. A batch closes once `max_tokens`
    source tokens wait; or once the requests it expects wait: as many as the last batch of those settings
    answered, plus those that were waiting when it ended (under steady load the clients just answered send
    again, and batches that went without them would split the load into two half-full ones for good); or
    `max_wait` seconds after its oldest request arrived or the last batch ended, whichever is later. The
    first batch of some settings expects no number and waits `max_wait`.

    Args:
        translate: decodes a list of texts with (beam size, nbest); `Translator.translate_nbest`.
        max_tokens: source tokens in one batch at most.
        max_wait: the longest a batch waits for the requests it expects, in seconds.
    """

    def __init__(self, translate: Callable[[list[str], int | None, int], list], max_tokens: int, max_wait: float):
        self.translate, self.max_tokens, self.max_wait = translate, max_tokens, max_wait
        self.waiting: deque[tuple[float, _Request]] = deque()  # (arrival time, request), oldest first
        self.changed = threading.Condition()
        self.closing = False
        self.batches = 0  # batches decoded, for /info and the tests
        self.thread = threading.Thread(target=self._run, name="mt-batcher", daemon=True)
        self.thread.start()

    def submit(self, texts: list[str], lengths: list[int], beam_size: int | None, nbest: int) -> Future:
        """Queues texts for decoding; the future gives their `Translation` lists, in order."""
        request = _Request(texts, lengths, (beam_size, nbest), Future())
        if not texts:
            request.future.set_result([])
            return request.future
        with self.changed:
            if self.closing:
                raise RuntimeError("the batcher is closed")
            self.waiting.append((time.monotonic(), request))
            self.changed.notify()
        return request.future

    def close(self) -> None:
        """Decodes what is waiting, then stops the thread."""
        with self.changed:
            self.closing = True
            self.changed.notify()
        self.thread.join()

    def _run(self) -> None:
        free_since = time.monotonic()
        expected: dict[tuple, int] = {}  # settings -> requests the next batch of them expects
        while True:
            with self.changed:
                while not self.waiting and not self.closing:
                    self.changed.wait()
                if not self.waiting:
                    return
                arrived, oldest = self.waiting[0]
                deadline = max(arrived, free_since) + self.max_wait
                wanted = expected.get(oldest.settings, math.inf)
                while not self.closing and not self._ready(oldest.settings, wanted) and (
                        left := deadline - time.monotonic()) > 0:
                    self.changed.wait(left)
                batch = self._take(oldest.settings)
            expected[oldest.settings] = self._decode(batch, oldest.settings)
            free_since = time.monotonic()

    def _alike(self, settings) -> list[_Request]:
        return [r for _, r in self.waiting if r.settings == settings]

    def _ready(self, settings, expected: float) -> bool:
        """Whether a batch is worth decoding now: `expected` requests wait, or `max_tokens` source tokens."""
        alike = self._alike(settings)
        return len(alike) >= expected or sum(sum(r.lengths[r.taken:]) for r in alike) >= self.max_tokens

    def _take(self, settings) -> list[tuple[_Request, int]]:
        """Up to `max_tokens` source tokens of the waiting texts, one from each request in turn (at least one)."""
        alike = self._alike(settings)
        batch, tokens = [], 0
        while alike:
            for request in list(alike):
                length = request.lengths[request.taken]
                if batch and tokens + length > self.max_tokens:
                    return batch
                batch.append((request, request.taken))
                tokens += length
                request.taken += 1
                if request.taken == len(request.texts):
                    alike.remove(request)
                    self.waiting.remove(next(w for w in self.waiting if w[1] is request))
        return batch

    def _decode(self, batch: list[tuple[_Request, int]], settings) -> int:
        """Decodes a batch and answers the requests it completes (or fails). Returns the requests of these
        settings the next batch expects: those waiting now, and those it answered (their clients may send
        again), counted before any answer goes out, so that no client is counted twice."""
        beam_size, nbest = settings
        try:
            outputs = on_model_thread(self.translate, [request.texts[i] for request, i in batch], beam_size, nbest)
        except BaseException as e:  # the requests in this batch fail, with what is left of them; the server goes on
            if isinstance(e, MtError):
                log.warning("a batch failed: %s", e)
            else:
                log.exception("decoding a batch failed")
            failed = {id(r): r for r, _ in batch}
            with self.changed:
                self.waiting = deque(w for w in self.waiting if id(w[1]) not in failed)
                expected = len(failed) + len(self._alike(settings))
            for request in failed.values():
                if not request.future.done():
                    request.future.set_exception(e)
            return expected
        self.batches += 1
        done = []
        for (request, _), output in zip(batch, outputs, strict=True):
            if not request.future.done():  # else an earlier batch of it failed
                request.results.append(output)
                if len(request.results) == len(request.texts):
                    done.append(request)
        with self.changed:
            expected = len(done) + len(self._alike(settings))
        for request in done:
            request.future.set_result(request.results)
        return expected


# Checking a request


def check_texts(texts: list[str], limits: Limits) -> None:
    """Raises ValueError naming the first text that is too long, holds control characters or is not text."""
    if not texts:
        raise ValueError("'text' is an empty list: give at least one text")
    if len(texts) > limits.max_texts:
        raise _TooLarge(f"{len(texts)} texts in one request; at most {limits.max_texts} (--max-texts)")
    for number, text in enumerate(texts, start=1):
        where = f"text {number}" if len(texts) > 1 else "text"
        if len(text) > limits.max_chars:
            raise _TooLarge(f"{where} has {len(text):,} characters; at most {limits.max_chars:,} (--max-chars)")
        for position, char in enumerate(text, start=1):
            if unicodedata.category(char) in ("Cc", "Cs") and char != "\t":
                what = "a lone surrogate (not valid UTF-8)" if unicodedata.category(char) == "Cs" else (
                    "a line break: send each line as its own text" if char in "\n\r" else "a control character")
                raise ValueError(f"{where}, character {position}: U+{ord(char):04X} is {what}")


class _TooLarge(ValueError):
    """A request over one of the size limits: 413."""


def _response(outputs: "list[list[Translation]]", scores: bool, nbest: int) -> dict[str, Any]:
    body: dict[str, Any] = {"translations": [options[0].text for options in outputs]}
    if scores:
        body["scores"] = [round(options[0].score, 4) for options in outputs]
    if nbest > 1:
        body["nbest"] = [[{"text": t.text, "score": round(t.score, 4)} for t in options] for options in outputs]
    return body


# The application


def create_app(translator: "Translator", limits: Limits = Limits(), run_name: str = ""):
    """The FastAPI application: /translate, /attention, /health, /info, / and /docs."""
    fastapi, _ = require_extra()
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException

    from mt import plots

    batcher: Batcher | None = None
    draw_lock = threading.Lock()  # matplotlib draws one figure at a time

    class TranslateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        text: str | list[str] = Field(description="A French text, or a list of them (one line each).")
        beam_size: int | None = Field(None, ge=1, le=limits.max_beam, description="Beam width (1 = greedy; "
                                      "default: the run's).")
        nbest: int = Field(1, ge=1, le=limits.max_beam, description="How many translations of each text.")
        scores: bool = Field(False, description="Return each translation's search score too.")

    class AttentionRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        text: str = Field(description="One French text.")
        layer: int | None = Field(None, ge=1, description="The decoder layer to draw (default: the last).")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        nonlocal batcher
        batcher = Batcher(lambda texts, beam, nbest: translator.translate_nbest(texts, beam, nbest=nbest),
                          limits.max_batch_tokens, limits.max_wait_ms / 1000)
        yield
        await asyncio.to_thread(batcher.close)  # in-flight requests are finished first

    about, page_html = run_info(translator, run_name), PAGE.read_text(encoding="utf-8")  # read once
    app = fastapi.FastAPI(title="mt", version=_version(), lifespan=lifespan,
                          description="French → English translation with a model trained by `mt train`.")
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = e.errors()
        if problems and problems[0].get("type") == "json_invalid":
            detail = problems[0].get("ctx", {}).get("error", "cannot parse")
            return error(400, f"the body is not valid JSON: {detail}")
        said = [f"{'.'.join(str(p) for p in problem.get('loc', ()) if p != 'body') or 'body'}: "
                f"{problem.get('msg', 'invalid')}" for problem in problems[:3]]
        return error(422, "; ".join(said) or "invalid request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error(500, f"internal error: {type(e).__name__}")

    async def checked(texts: list[str]) -> list[int] | JSONResponse:
        """Source lengths in tokens, or the error response for texts that cannot be translated."""
        try:
            check_texts(texts, limits)
        except _TooLarge as e:
            return error(413, str(e))
        except ValueError as e:
            return error(422, str(e))
        return [len(ids) for ids in translator.encode(texts)]

    @app.post("/translate", summary="Translate one text or a list of texts")
    async def translate(request: TranslateRequest) -> dict[str, Any]:
        texts = [request.text] if isinstance(request.text, str) else request.text
        lengths = await checked(texts)
        if isinstance(lengths, JSONResponse):
            return lengths
        beam = request.beam_size or translator.config.decode.beam_size
        if request.nbest > beam:
            return error(422, f"nbest {request.nbest} needs a beam at least as wide: beam_size {request.nbest} or "
                              "more")
        if 2 * beam > translator.tokenizer.vocab_size:
            return error(422, f"beam_size {beam} is too large for this model's vocabulary of "
                              f"{translator.tokenizer.vocab_size} pieces")
        try:
            outputs = await asyncio.wrap_future(batcher.submit(texts, lengths, beam, request.nbest))
        except MtError as e:
            return error(422, str(e))
        return _response(outputs, request.scores, request.nbest)

    @app.post("/attention", summary="The cross-attention heatmap of one text's translation, as a PNG",
              response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def attention(request: AttentionRequest) -> Response:
        lengths = await checked([request.text])
        if isinstance(lengths, JSONResponse):
            return lengths
        layers = translator.attention_layers
        if request.layer is not None and request.layer > layers:
            return error(422, f"layer {request.layer} is out of range: the model has {layers} decoder layers")
        [options] = await asyncio.wrap_future(batcher.submit([request.text], lengths,
                                                             translator.config.decode.beam_size, 1))

        def draw() -> bytes:
            weights, source, output = on_model_thread(translator.attention_map, request.text, options[0].tokens)
            with draw_lock:
                return plots.png(plots.attention_figure(weights, source, output, (request.layer or layers) - 1))

        try:
            return Response(await asyncio.to_thread(draw), media_type="image/png")
        except MtError as e:
            return error(422, str(e))

    @app.get("/health", summary="Ready once the model is loaded")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info", summary="The run, its model and its decoding settings")
    async def info() -> dict[str, Any]:
        return about | {"limits": vars(limits), "batches_decoded": batcher.batches}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    return app


def run_info(translator: "Translator", run_name: str) -> dict[str, Any]:
    """What /info tells about a run: its name, size, vocabulary, decoding settings and best validation BLEU."""
    from mt import checkpoint
    from mt.config import config_to_dict

    bleus = []
    if translator.weights is not None:
        bleus = [r["valid_bleu"] for r in checkpoint.read_metrics(translator.weights.parent) if "valid_bleu" in r]
    return {
        "run": run_name,
        "weights": translator.weights.name if translator.weights is not None else None,
        "parameters": translator.num_parameters(),
        "vocabulary": translator.tokenizer.vocab_size,
        "decode": config_to_dict(translator.config)["decode"],
        "best_valid_bleu": max(bleus) if bleus else None,
    }


class _BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413, by its Content-Length or, for a body sent in
    chunks, once that many bytes have come (the body is then read here and handed on whole)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        too_large = JSONResponse({"error": f"the request body is over {self.max_bytes:,} bytes (--max-body-bytes)"},
                                 status_code=413)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await too_large(scope, receive, send)
        sent = False

        async def whole():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, whole, send)


def _server_class():
    _, uvicorn = require_extra()

    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGTERM and SIGINT end it with exit code 0 once it has stopped (uvicorn
        raises the signal again, so that the process dies of it)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mt")
    except PackageNotFoundError:
        return "0"


def serve(translator: "Translator", run_name: str, host: str, port: int, limits: Limits,
          ready: Callable[[str], None] = print) -> None:
    """Serves `translator` until SIGTERM or Ctrl-C, which stop new connections and finish the requests in flight.

    Raises:
        MtError: if the address cannot be bound (in use, or not this machine's).
    """
    _, uvicorn = require_extra()
    app = create_app(translator, limits, run_name)
    server_class = _server_class()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MtError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)  # connections wait from now on, until the server accepts them
    bound = sock.getsockname()[1]
    server = server_class(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=60))
    ready(f"serving {run_name} on http://{host if family == socket.AF_INET else f'[{host}]'}:{bound} "
          "(Ctrl-C to stop)")
    server.run(sockets=[sock])
