"""The HTTP application: OpenAI's chat and completions endpoints, tokenizer endpoints, metrics and
the chat page, over one `EngineWorker`.

A request becomes one engine request per choice (`n` of them per prompt; with a seed, choice j uses
seed + j). Limits are checked before anything is queued, so a bad request costs the engine
nothing; a full queue is a 429 with Retry-After. Text is released through `IncrementalText`
(whole characters, stop strings cut), and a stop string aborts its engine request at once. A
client that goes away aborts its requests, which frees their rows at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from ..chat import parse_assistant, render_chat
from ..inference.batching import Engine, Request, SamplingParams, StepOutput, TokenLogprob
from ..model import Llama4
from ..tokenizer import Tokenizer
from .metrics import Metrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                       to_herd_messages)
from .text import IncrementalText, token_bytes, token_string
from .worker import EngineFailed, EngineWorker, QueueFull

log = logging.getLogger("herd.serve")


@dataclass
class ServeConfig:
    model_name: str = "herd"
    api_key: str | None = None
    max_batch: int = 8
    max_waiting: int = 64  # beyond running + this many waiting, requests get 429
    max_body_bytes: int = 32 * 2**20
    max_prompt_tokens: int | None = None  # None: the model's context
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    max_n: int = 8
    max_images: int = 8
    max_image_pixels: int = 25_000_000
    compile: bool = False
    generation_defaults: dict = field(default_factory=dict)  # temperature/top_p/top_k from generation_config.json


# ------------------------------------------------------------------------------------------------
# One HTTP request's generation: its choices' engine requests and their text
# ------------------------------------------------------------------------------------------------

@dataclass
class Event:
    index: int  # the choice
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    tool_call: str | None = None  # the code of a finished reply's <|python_start|>...<|python_end|>


@dataclass
class _Choice:
    index: int
    prompt_index: int
    text: IncrementalText
    prompt_tokens: int
    completion_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finished: bool = False


class Generation:
    def __init__(self, worker: EngineWorker, id: str, requests: list[Request], choices: list[_Choice]):
        self.worker, self.id = worker, id
        self.choices = {r.id: c for r, c in zip(requests, choices)}
        try:
            self.queue = worker.submit(requests)
        except QueueFull:
            raise APIError(429, "the server is busy (its request queue is full); retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None

    @property
    def usage(self) -> dict:
        # A prompt counts once, however many choices it has.
        prompts = {c.prompt_index: c.prompt_tokens for c in self.choices.values()}
        prompt, completion = sum(prompts.values()), sum(c.completion_tokens for c in self.choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def events(self):
        """Yields Events until every choice has finished; aborts what is left if abandoned."""
        try:
            while not all(c.finished for c in self.choices.values()):
                out = await self.queue.get()
                if isinstance(out, EngineFailed):
                    raise APIError(500, "the engine failed on this request", type="server_error")
                if isinstance(out, ValueError):  # the engine refused the request
                    raise APIError(400, str(out))
                event = self._step(out)
                if event is not None:
                    yield event
        finally:
            for rid, c in self.choices.items():
                if not c.finished:
                    self.worker.abort(rid)

    async def collect(self, request: HTTPRequest) -> list[Event]:
        """All events of a reply that is not streamed. A client that hangs up before it is complete
        aborts it (checked twice a second), as a dropped stream does."""
        events: list[Event] = []

        async def consume():
            async for event in self.events():
                events.append(event)

        task = asyncio.ensure_future(consume())
        while not (await asyncio.wait({task}, timeout=0.5))[0]:
            if await request.is_disconnected():
                task.cancel()  # events()' finally aborts the engine requests
                raise APIError(499, "the client closed the connection")
        task.result()  # raises what consume raised
        return events

    def _step(self, out: StepOutput) -> Event | None:
        c = self.choices[out.request_id]
        if c.finished:  # already ended by a stop string; this is the engine's "abort" echo
            return None
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        c.completion_tokens += len(out.token_ids)
        text = c.text.add(out.token_ids)
        reason = None
        if c.text.stopped:
            reason = "stop"
            if not out.finished:
                self.worker.abort(out.request_id)
        elif out.finished:
            text += c.text.flush()
            reason = "stop" if out.finish_reason == "abort" else out.finish_reason
        c.finished = reason is not None
        tool_call = None
        if c.finished and c.text.held and not c.text.stopped:
            tool_call = parse_assistant(c.text.ids, c.text.tokenizer).tool_call
            reason = "tool_calls"
        return Event(c.index, text, out.logprobs or [], reason, tool_call)


# ------------------------------------------------------------------------------------------------
# The application
# ------------------------------------------------------------------------------------------------

class Guard:
    """Refuses, before anything is read: bodies without Content-Length (411) or over the limit (413),
    and /v1/* without the API key (401, compared in constant time). Plain ASGI rather than
    `@app.middleware`, which would wrap `receive` and hide a client's disconnect from the handlers."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        refusal = self.check(scope) if scope["type"] == "http" else None
        if refusal is None:
            return await self.app(scope, receive, send)
        return await JSONResponse(refusal.body(), status_code=refusal.status)(scope, receive, send)

    def check(self, scope) -> APIError | None:
        headers, limit = Headers(scope=scope), self.config.max_body_bytes
        length = headers.get("content-length")
        if length is None and scope["method"] == "POST":  # a chunked body could not be bounded before reading
            return APIError(411, "send the body with a Content-Length header")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return APIError(413, f"the request body is over {limit} bytes")
        key = self.config.api_key
        if key is not None and scope["path"].startswith("/v1/"):
            if not hmac.compare_digest(headers.get("authorization", "").encode(), f"Bearer {key}".encode()):
                return APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                code="invalid_api_key")
        return None


def create_app(model: Llama4, tokenizer: Tokenizer, config: ServeConfig) -> FastAPI:
    context = model.config.text.max_position_embeddings
    max_prompt = min(config.max_prompt_tokens or context, context - 1)
    image_processor = None
    if model.vision is not None:
        from ..data.images import ImageProcessor

        image_processor = ImageProcessor.from_config(model.config.vision)
        image_processor.max_pixels = config.max_image_pixels
    metrics = Metrics()

    def make_engine():
        return Engine(model, max_batch=config.max_batch, compile=config.compile)

    worker = EngineWorker(make_engine, config.max_batch, config.max_waiting, metrics)

    async def lifespan(app):
        worker.start()
        yield
        worker.stop()  # uvicorn has drained the running requests by now (graceful shutdown)

    app = FastAPI(title="herd", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker, app.state.metrics = worker, metrics

    # ---------------------------------------------------------------- errors, auth, body size
    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        else:
            message = f"{where or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(APIError(400, message, param=where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):  # unknown paths, wrong methods
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):  # the traceback goes to the log, never to the client
        log.exception("unhandled error")
        return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)

    app.add_middleware(Guard, config=config)

    # ---------------------------------------------------------------- helpers
    def check_model(name: str):
        if name != config.model_name:
            raise APIError(404, f"model {name!r} is not served here; use {config.model_name!r}",
                           param="model", code="model_not_found")

    def check_prompt(ids: list[int]):
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > max_prompt:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server takes at most {max_prompt}",
                           param="prompt", code="context_length_exceeded")
        bad = next((t for t in ids if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                           param="prompt")

    def sampling(body, max_tokens: int | None, prompt_len: int, logprobs: int | None, prompt_logprobs: bool,
                 choice: int) -> SamplingParams:
        room = context - prompt_len
        if max_tokens is None:
            max_tokens = min(room, config.max_tokens_limit)
        elif max_tokens > config.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {config.max_tokens_limit}",
                           param="max_tokens")
        elif max_tokens > room:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                           f"{context}; lower max_tokens to at most {room}", param="max_tokens",
                           code="context_length_exceeded")
        defaults = config.generation_defaults
        temperature = body.temperature if body.temperature is not None else defaults.get("temperature", 1.0)
        top_p = body.top_p if body.top_p is not None else defaults.get("top_p", 1.0)
        top_k = body.top_k if body.top_k is not None else defaults.get("top_k")
        return SamplingParams(
            max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
            top_k=top_k if top_k and top_k > 0 else None,
            seed=None if body.seed is None else body.seed + choice,
            stop_token_ids=() if body.ignore_eos else tuple(tokenizer.stop_ids),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def start(body, prompts: list[tuple[list[int], object]], max_tokens, logprobs, prompt_logprobs,
              chat: bool = False) -> Generation:
        if body.n > config.max_n:
            raise APIError(400, f"n is {body.n}; this server allows at most {config.max_n}", param="n")
        stop = body.stop_strings()
        rid = uuid.uuid4().hex
        requests, choices = [], []
        for p, (ids, pixels) in enumerate(prompts):
            check_prompt(ids)
            for j in range(body.n):
                index = p * body.n + j
                requests.append(Request(f"{rid}-{index}", ids, sampling(body, max_tokens, len(ids), logprobs,
                                                                          prompt_logprobs, j), pixels))
                text = IncrementalText(tokenizer, stop, hold_from=tokenizer.python_start_id if chat else None)
                choices.append(_Choice(index, p, text, len(ids)))
        return Generation(worker, rid, requests, choices)

    def chat_logprobs(entries: list[TokenLogprob]) -> dict:
        def one(token_id, logprob):
            return {"token": token_string(tokenizer, token_id), "logprob": logprob,
                    "bytes": list(token_bytes(tokenizer, token_id))}
        return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}

    def completion_logprobs(entries: list[tuple[int, float | None, list[tuple[int, float]] | None]],
                            offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for token_id, lp, top in entries:
            s = token_string(tokenizer, token_id)
            tokens.append(s)
            token_lps.append(lp)
            tops.append(None if top is None else {token_string(tokenizer, t): v for t, v in top})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    # ---------------------------------------------------------------- endpoints
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "herd", "max_model_len": context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        check_model(body.model)
        messages = to_herd_messages(body.messages, config.max_images)
        if image_processor is None and any(isinstance(m["content"], list) and any(p["type"] == "image" for p in
                                                                                 m["content"]) for m in messages):
            raise APIError(400, "this model has no vision tower (a text-only checkpoint): send text only",
                           param="messages")
        try:  # images are decoded and tiled off the event loop
            rendered = await asyncio.to_thread(render_chat, messages, tokenizer, add_generation_prompt=True,
                                               image_processor=image_processor)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens == 0:
            raise APIError(400, "max_tokens must be at least 1 for a chat completion", param="max_tokens")
        gen = start(body, [(rendered.ids, rendered.pixel_values)], max_tokens, logprobs, False, chat=True)
        created, cid = int(time.time()), f"chatcmpl-{gen.id}"

        def tool_calls(index: int, code: str) -> list[dict]:
            # Llama 4's one tool call per turn: code for its python tool.
            return [{"index": 0, "id": f"call_{gen.id}_{index}", "type": "function",
                     "function": {"name": "python", "arguments": json.dumps({"code": code})}}]

        def chunk(choices, usage=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": config.model_name,
                    "choices": choices, "usage": usage}

        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage

            async def stream():
                for i in range(body.n):
                    yield sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}]))
                try:
                    async for e in gen.events():
                        if e.text or e.finish_reason or (logprobs is not None and e.logprobs):
                            delta = {"content": e.text} if e.text else {}
                            if e.tool_call is not None:
                                delta["tool_calls"] = tool_calls(e.index, e.tool_call)
                            yield sse(chunk([{"index": e.index, "delta": delta,
                                              "logprobs": chat_logprobs(e.logprobs) if logprobs is not None else None,
                                              "finish_reason": e.finish_reason}]))
                except APIError as err:
                    yield sse(err.body())
                    return
                if include_usage:
                    yield sse(chunk([], gen.usage))
                yield "data: [DONE]\n\n"
            return StreamingResponse(stream(), media_type="text/event-stream")

        texts = [""] * body.n
        lps: list[list[TokenLogprob]] = [[] for _ in range(body.n)]
        reasons = [None] * body.n
        messages = [{"role": "assistant"} for _ in range(body.n)]
        for e in await gen.collect(request):
            texts[e.index] += e.text
            lps[e.index] += e.logprobs
            reasons[e.index] = e.finish_reason or reasons[e.index]
            if e.tool_call is not None:
                messages[e.index]["tool_calls"] = tool_calls(e.index, e.tool_call)
        for i, message in enumerate(messages):
            message["content"] = texts[i] if texts[i] or "tool_calls" not in message else None
        return {"id": cid, "object": "chat.completion", "created": created, "model": config.model_name,
                "choices": [{"index": i, "message": messages[i],
                             "logprobs": chat_logprobs(lps[i]) if logprobs is not None else None,
                             "finish_reason": reasons[i]} for i in range(body.n)],
                "usage": gen.usage}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        check_model(body.model)
        p = body.prompt
        if isinstance(p, str):
            prompts = [tokenizer.encode(p, bos=True)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [tokenizer.encode(x, bos=True) for x in p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = [list(x) for x in p]
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        want = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default for completions
        # max_tokens 0 with echo scores the prompt alone: the engine is asked for one token, which is dropped.
        scoring_only = want == 0
        if scoring_only and not body.echo:
            raise APIError(400, "max_tokens 0 is only meaningful with echo", param="max_tokens")
        gen = start(body, [(ids, None) for ids in prompts], max(want, 1), body.logprobs, body.echo and
                    body.logprobs is not None)
        created, cid = int(time.time()), f"cmpl-{gen.id}"
        choice_prompt = {i: prompts[i // body.n] for i in range(len(prompts) * body.n)}

        def echo_part(index: int, prompt_lps) -> tuple[str, list]:
            ids = choice_prompt[index]
            # a prompt token's top logprobs: itself and the most likely token there (OpenAI's echo gives
            # the top `logprobs` and the token; the engine keeps the top 1, enough to tell greedy tokens)
            entries = [(t, None, None) if e is None else
                       (t, e.logprob, [(t, e.logprob)] + [b for b in e.top if b[0] != t])
                       for t, e in zip(ids, prompt_lps or [None] * len(ids))]
            return tokenizer.decode(ids, skip_special=True), entries

        def gen_entries(events_lps: list[TokenLogprob]) -> list:
            return [(e.token_id, e.logprob, e.top) for e in events_lps]

        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage

            async def stream():
                echoed = set()
                try:
                    async for e in gen.events():
                        c = next(c for c in gen.choices.values() if c.index == e.index)
                        text, entries = e.text, [] if scoring_only else gen_entries(e.logprobs)
                        if scoring_only:
                            text = ""
                        if body.echo and e.index not in echoed:
                            echoed.add(e.index)
                            prefix, prompt_entries = echo_part(e.index, c.prompt_logprobs)
                            text, entries = prefix + text, prompt_entries + entries
                        yield sse({"id": cid, "object": "text_completion", "created": created,
                                   "model": config.model_name,
                                   "choices": [{"index": e.index, "text": text, "finish_reason": e.finish_reason,
                                                "logprobs": completion_logprobs(entries, 0)
                                                if body.logprobs is not None else None}]})
                except APIError as err:
                    yield sse(err.body())
                    return
                if include_usage:
                    if scoring_only:
                        for c in gen.choices.values():
                            c.completion_tokens = 0
                    yield sse({"id": cid, "object": "text_completion", "created": created,
                               "model": config.model_name, "choices": [], "usage": gen.usage})
                yield "data: [DONE]\n\n"
            return StreamingResponse(stream(), media_type="text/event-stream")

        n = len(choice_prompt)
        texts, entries, reasons = [""] * n, [[] for _ in range(n)], [None] * n
        for e in await gen.collect(request):
            texts[e.index] += e.text
            entries[e.index] += gen_entries(e.logprobs)
            reasons[e.index] = e.finish_reason or reasons[e.index]
        choices = []
        for c in sorted(gen.choices.values(), key=lambda c: c.index):
            i = c.index
            text, lps = ("", []) if scoring_only else (texts[i], entries[i])
            if scoring_only:
                c.completion_tokens = 0
            if body.echo:
                prefix, prompt_entries = echo_part(i, c.prompt_logprobs)
                text, lps = prefix + text, prompt_entries + lps
            choices.append({"index": i, "text": text, "finish_reason": reasons[i],
                            "logprobs": completion_logprobs(lps, 0) if body.logprobs is not None else None})
        return {"id": cid, "object": "text_completion", "created": created, "model": config.model_name,
                "choices": choices, "usage": gen.usage}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt (a string) and messages (a chat)")
        if body.prompt is not None:
            ids = tokenizer.encode(body.prompt, bos=body.add_special_tokens)
        else:
            try:
                ids = render_chat(to_herd_messages(body.messages, config.max_images), tokenizer,
                                  add_generation_prompt=True, image_processor=image_processor).ids
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        bad = next((t for t in body.tokens if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                           param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/metrics")
    async def prometheus():
        engine = worker.engine
        return PlainTextResponse(metrics.render({
            "herd_requests_running": ("Requests in engine rows.", lambda: engine.num_running),
            "herd_requests_waiting": ("Requests queued for a row.",
                                      lambda: max(0, worker.in_flight() - engine.num_running)),
        }), media_type="text/plain; version=0.0.4")

    page = resources.files("herd.serve").joinpath("static/index.html")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page.read_text(encoding="utf-8"))

    return app
