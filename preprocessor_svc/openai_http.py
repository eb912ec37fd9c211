"""The gateway's OpenAI-compatible HTTP front door (`vlm serve-preprocessor --http-port P`).

    POST /v1/chat/completions   messages (text, image_url, video_url parts), streaming or not
    POST /v1/completions        text or token-ID prompt, streaming or not
    GET  /v1/models[/{id}]      the served model name
    GET  /health                200 while the gateway serves, else 503; each replica's state

A FastAPI app served by uvicorn on the gRPC server's event loop (`OpenAIHttpServer`); the
request and response bodies are vLLM's own OpenAI protocol models. A request becomes a
`vlm.types.PromptInput` + `Sampling` and goes through `Gateway.generate`, like the gRPC
`Generate`: same preprocessing (vLLM's renderer applies the chat template), routing, failover.

- Media travel inline only: `data:<mime>;base64,<data>` URLs. The server never fetches a URL
  or reads a path; any other scheme is a 400. Bodies over 64 KiB are parsed and their base64
  decoded on a worker thread, not on the event loop.
- Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}` with the HTTP status of
  the `vlm.errors` class (`VlmError.http_status`); `type` is the error's reason
  (INVALID_ARGUMENT, INVALID_MEDIA, LIMIT_EXCEEDED, ...), `code` the HTTP status, `param` the
  request field at fault. A field this server does not implement (tools, n > 1,
  response_format, ...) is a 400 naming it, never silently ignored.
- An error before the first token is an HTTP error; after a stream started, one SSE event
  `data: {"error": ...}` ends it. A client that disconnects cancels its generation (closing the
  gateway's stream cancels the upstream call, which aborts the engine request).
- Logprob tokens are rendered with the model's tokenizer (loaded on the first request that asks
  for logprobs), as vLLM's own server renders them.
- Security follows the gRPC port's (`vlm.security.ServerSecurity`): with a token, every route
  but `/health` requires `Authorization: Bearer <token>` (what the `openai` SDK sends as its API
  key; else 401); with a certificate, HTTPS, and with a client CA, client certificates (mTLS).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import re
import socket
import ssl
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from vllm.entrypoints.generate.base.protocol import DeltaMessage
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
)
from vllm.entrypoints.openai.chat_completion.protocol import ChatMessage as AssistantMessage
from vllm.entrypoints.openai.completion.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
)
from vllm.entrypoints.serve.engine.protocol import (
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokenUsageInfo,
    UsageInfo,
)

from vlm import types, vllm_errors
from vlm.errors import (
    Internal,
    InvalidArgument,
    InvalidMedia,
    LimitExceeded,
    ModelNotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    UpstreamError,
    VlmError,
)
from vlm.server import METRICS_PREFIX, request_id_var

log = logging.getLogger(__name__)

#: Bodies larger than this are parsed (JSON, validation, base64) on a worker thread.
INLINE_PARSE_BYTES = 64 << 10
#: vLLM's floor for logprobs that JSON cannot carry (-inf).
_MIN_LOGPROB = -9999.0

#: Request fields this server implements; any other field must be absent or hold its default.
CHAT_FIELDS = frozenset({
    "messages", "model", "stream", "stream_options", "request_id", "user",
    "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "max_completion_tokens",
    "min_tokens", "stop", "stop_token_ids", "ignore_eos", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "skip_special_tokens",
    "add_generation_prompt", "return_token_ids", "mm_processor_kwargs",
})
COMPLETION_FIELDS = frozenset({
    "prompt", "model", "stream", "stream_options", "request_id", "user",
    "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "stop",
    "stop_token_ids", "ignore_eos", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "logprobs", "skip_special_tokens", "return_token_ids",
})
_MESSAGE_KEYS = frozenset({"role", "content", "name"})
_MEDIA_PARTS = {"image_url": types.Modality.IMAGE, "video_url": types.Modality.VIDEO}
#: pydantic error-location entries that name a union member or a type, not a request field.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
_GENERATE_ROUTES = ("/v1/chat/completions", "/v1/completions")
_ROUTES = (*_GENERATE_ROUTES, "/v1/models", "/health")

_Req = TypeVar("_Req", bound=BaseModel)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


# ----------------------------------------------------------------------------- errors


def _param(field_path: str | None) -> str | None:
    """A `vlm.errors` field path (gRPC request names) as the OpenAI request's parameter."""
    if not field_path:
        return None
    p = field_path.removeprefix("sampling.").removeprefix("prompt.")
    if p in ("text", "token_ids"):
        return "prompt"
    return re.sub(r"\.media(\.\w+)?$", "", p)


def error_body(err: VlmError) -> ErrorResponse:
    where = err.upstream_field if isinstance(err, UpstreamError) else err.field
    return ErrorResponse(error=ErrorInfo(
        message=err.message, type=err.reason, param=_param(where), code=err.http_status
    ))


def error_response(err: VlmError) -> Response:
    return Response(error_body(err).model_dump_json(), status_code=err.http_status,
                    media_type="application/json")


def _loc_param(loc: Iterable[Any]) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part not in _TYPE_TAGS and re.fullmatch(r"[a-z_][a-z0-9_]*", part):
            out += f".{part}" if out else part
    return out or None


# ----------------------------------------------------------------------------- request parsing


@dataclass(frozen=True)
class _Parsed:
    request: ChatCompletionRequest | CompletionRequest
    prompt: types.PromptInput
    sampling: types.Sampling
    processor_kwargs: Mapping[str, Any] | None = None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"the request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return obj


def _validate(cls: type[_Req], obj: dict[str, Any], supported: frozenset[str]) -> _Req:
    try:
        req = cls.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        raise InvalidArgument(first["msg"], field=_loc_param(first["loc"])) from None
    except Exception as e:  # noqa: BLE001 - vLLM's validators; translated in one table
        err = vllm_errors.translate(e, vllm_errors.OPENAI_REQUEST)
        if err is None:
            raise
        raise err from None
    for name in req.model_extra or {}:
        raise InvalidArgument(f"unknown field {name!r}", field=name)
    unsupported = req.model_fields_set - supported
    for name, info in type(req).model_fields.items():  # declaration order: `tools` before `tool_choice`
        if name in unsupported and getattr(req, name) != info.get_default(call_default_factory=True):
            raise InvalidArgument(f"{name} is not supported by this server", field=name)
    opts = req.stream_options
    if opts is not None and opts.continuous_usage_stats:
        raise InvalidArgument("continuous_usage_stats is not supported by this server",
                              field="stream_options.continuous_usage_stats")
    return req


def _data_url_media(url: Any, modality: types.Modality, where: str) -> types.Media:
    """Decode a `data:<mime>;base64,<payload>` URL; nothing else is accepted."""
    if not isinstance(url, str):
        raise InvalidArgument("the URL must be a string", field=where)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme != "data":
        shown = f"{scheme}:// URLs" if scheme else "URLs without a scheme"
        raise InvalidArgument(
            f"only data: URLs are accepted (data:<mime>;base64,<data>, the media inline); this "
            f"server never fetches or reads media, and {shown} are refused", field=where)
    header, comma, payload = url[5:].partition(",")
    params = [p.strip().lower() for p in header.split(";")]
    if not comma or "base64" not in params[1:]:
        raise InvalidArgument("data: URLs must be base64-encoded (data:<mime>;base64,<data>)",
                              field=where)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidMedia("invalid base64 in the data: URL", field=where) from None
    return types.Media(modality, data, params[0])


def _chat_part(part: Any, where: str) -> types.ChatPart:
    if not isinstance(part, dict):
        raise InvalidArgument("a content part must be an object", field=where)
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidArgument("a text part needs a string 'text'", field=f"{where}.text")
        return types.ChatPart(text=text)
    if kind in _MEDIA_PARTS:
        ref = part.get(kind)
        url = ref.get("url") if isinstance(ref, dict) else ref
        return types.ChatPart(media=_data_url_media(url, _MEDIA_PARTS[kind], f"{where}.{kind}.url"))
    raise InvalidArgument(
        f"content part type {kind!r} is not supported (text, image_url, video_url)",
        field=f"{where}.type")


def _chat_messages(raw: Any) -> tuple[types.ChatMessage, ...]:
    """The request's messages (as sent: pydantic's view of them is lazy and lenient)."""
    out = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidArgument("a message must be an object", field=where)
        for key in msg:
            if key not in _MESSAGE_KEYS:
                raise InvalidArgument(f"message field {key!r} is not supported by this server",
                                      field=f"{where}.{key}")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str):
            raise InvalidArgument("a message needs a string 'role'", field=f"{where}.role")
        if content is None:
            parts: tuple[types.ChatPart, ...] = ()
        elif isinstance(content, str):
            parts = (types.ChatPart(text=content),)
        elif isinstance(content, list):
            parts = tuple(_chat_part(p, f"{where}.content[{j}]") for j, p in enumerate(content))
        else:
            raise InvalidArgument("content must be a string or a list of parts",
                                  field=f"{where}.content")
        out.append(types.ChatMessage(role, parts))
    return tuple(out)


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _sampling(req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
              logprobs: int | None) -> types.Sampling:
    return types.Sampling(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens or None,
        stop=_stop(req.stop), stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos, repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        logprobs=logprobs,
        skip_special_tokens=(
            req.skip_special_tokens if "skip_special_tokens" in req.model_fields_set else None
        ),
    )


def parse_chat(body: bytes) -> _Parsed:
    obj = _json_object(body)
    req = _validate(ChatCompletionRequest, obj, CHAT_FIELDS)
    messages = _chat_messages(obj["messages"])
    if not messages:
        raise InvalidArgument("messages must not be empty", field="messages")
    # `max_tokens` is deprecated in the model (reading the attribute warns), not in the API.
    max_tokens = req.max_completion_tokens
    if max_tokens is None:
        max_tokens = req.__dict__.get("max_tokens")
    return _Parsed(
        req,
        types.PromptInput(messages=messages, add_generation_prompt=req.add_generation_prompt),
        _sampling(req, max_tokens, req.top_logprobs if req.logprobs else None),
        req.mm_processor_kwargs,
    )


def parse_completion(body: bytes) -> _Parsed:
    req = _validate(CompletionRequest, _json_object(body), COMPLETION_FIELDS)
    prompt = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        prompt_in = types.PromptInput(text=prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        prompt_in = types.PromptInput(token_ids=tuple(prompt))
    else:
        raise InvalidArgument("one prompt per request: a string or a list of token IDs",
                              field="prompt")
    return _Parsed(req, prompt_in, _sampling(req, req.max_tokens, req.logprobs))


# ----------------------------------------------------------------------------- output


@dataclass
class _Output:
    """What the chunks of one generation add up to."""

    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[types.PositionLogprobs] = field(default_factory=list)
    last: types.Chunk | None = None

    def add(self, chunk: types.Chunk) -> None:
        self.token_ids.extend(chunk.token_ids)
        self.text.append(chunk.text)
        self.logprobs.extend(chunk.logprobs)
        self.last = chunk


def _usage(usage: types.Usage | None, completion_tokens: int) -> UsageInfo:
    if usage is None:  # a final chunk always has it; be safe
        return UsageInfo(prompt_tokens=0, completion_tokens=completion_tokens,
                         total_tokens=completion_tokens)
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=(
            PromptTokenUsageInfo(cached_tokens=usage.cached_tokens) if usage.cached_tokens else None
        ),
    )


def _finish(chunk: types.Chunk | None) -> tuple[str | None, str | int | None]:
    if chunk is None or chunk.finish_reason is None:
        return None, None
    return chunk.finish_reason.value, chunk.stop_reason


TokenText = Callable[[list[int]], list[str]]


def _chat_logprobs(positions: Iterable[types.PositionLogprobs], token_text: TokenText) -> ChatCompletionLogProbs:
    content = []
    for p in positions:
        ids = [p.sampled.token_id, *(t.token_id for t in p.top)]
        texts = token_text(ids)
        top = [
            ChatCompletionLogProb(token=s, logprob=max(t.logprob, _MIN_LOGPROB), bytes=list(s.encode()))
            for t, s in zip(p.top, texts[1:], strict=True)
        ]
        content.append(ChatCompletionLogProbsContent(
            token=texts[0], logprob=max(p.sampled.logprob, _MIN_LOGPROB),
            bytes=list(texts[0].encode()), top_logprobs=top,
        ))
    return ChatCompletionLogProbs(content=content)


def _completion_logprobs(positions: Iterable[types.PositionLogprobs], token_text: TokenText,
                         offset: int) -> CompletionLogProbs:
    out = CompletionLogProbs()
    for p in positions:
        texts = token_text([p.sampled.token_id, *(t.token_id for t in p.top)])
        out.text_offset.append(offset)
        offset += len(texts[0])
        out.tokens.append(texts[0])
        out.token_logprobs.append(max(p.sampled.logprob, _MIN_LOGPROB))
        out.top_logprobs.append(
            {s: max(t.logprob, _MIN_LOGPROB) for t, s in zip(p.top, texts[1:], strict=True)} or None
        )
    return out


def _sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json(exclude_unset=True)}\n\n"


# ----------------------------------------------------------------------------- the front door


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


_T = TypeVar("_T")


async def _unless_disconnected(aw: Awaitable[_T], request: Request) -> _T:
    """`await aw`, cancelled (raising `_ClientGone`) if the client disconnects first."""
    task = asyncio.ensure_future(aw)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise _ClientGone
    finally:
        for t in (task, gone):
            t.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)


async def _drain(stream: AsyncIterator[types.Chunk]) -> _Output:
    out = _Output()
    async for chunk in stream:
        out.add(chunk)
    return out


@dataclass
class FrontDoor:
    """What the routes need: names, the gateway once warm, limits."""

    model: str
    served_model_name: str
    replicas: Any = None  # preprocessor_svc.replicas.ReplicaSet | None
    max_body_bytes: int = 256 << 20
    #: Loads the model's tokenizer (blocking; called once, on a worker thread) for logprobs.
    tokenizer_loader: Callable[[], Any] | None = None
    #: When set, `Authorization: Bearer <api_key>` is required on every route but /health.
    api_key: str | None = None
    #: The gRPC server's request-memory budget (`vlm.admission.RequestBudget`), shared.
    budget: Any = None
    gateway: Any = None  # preprocessor_svc.gateway.Gateway, attached after warm-up
    stopping: bool = False
    _token_text: TokenText | None = field(default=None, repr=False)
    _tokenizer_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    # -- helpers -------------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(),
                                                                 self.api_key.encode()):
            raise Unauthenticated("a valid API key is required (Authorization: Bearer <key>)")

    def _ready_gateway(self) -> Any:
        if self.stopping:
            raise Unavailable("the server is shutting down")
        if self.gateway is None:
            raise Unavailable("the gateway is warming up (or waiting for a model replica)")
        return self.gateway

    def check_model(self, name: str | None) -> None:
        if name and name != self.served_model_name:
            raise ModelNotFound(
                f"the model {name!r} does not exist; this server serves {self.served_model_name!r}",
                field="model")

    async def token_text(self) -> TokenText:
        if self._token_text is not None:
            return self._token_text
        async with self._tokenizer_lock:
            if self._token_text is None:
                self._token_text = await asyncio.to_thread(self._load_token_text)
        return self._token_text

    def _load_token_text(self) -> TokenText:
        if self.tokenizer_loader is None:
            return lambda ids: [f"token_id:{t}" for t in ids]
        from vllm.tokenizers.detokenizer_utils import convert_ids_list_to_tokens

        tokenizer = self.tokenizer_loader()
        return lambda ids: convert_ids_list_to_tokens(tokenizer, ids)

    async def _parse_body(self, request: Request, chat: bool) -> _Parsed:
        """Read and parse the body under the request-memory budget shared with the gRPC port
        (`vlm.admission`): the declared length (else the limit) is held while the body arrives
        and is parsed; until it fits, the body is left unread (uvicorn pauses the socket)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_big = f"the request body exceeds {limit} bytes"
        if declared.isdigit() and int(declared) > limit:
            raise LimitExceeded(too_big)
        held = 0
        if self.budget is not None:
            held = min(int(declared) if declared.isdigit() else limit, self.budget.limit_bytes)
            await self.budget.reserve(held)
        try:
            parts, size = [], 0
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise LimitExceeded(too_big)
                parts.append(part)
            body = b"".join(parts)
            del parts
            parse = parse_chat if chat else parse_completion
            return await asyncio.to_thread(parse, body) if size > INLINE_PARSE_BYTES else parse(body)
        finally:
            if held:
                self.budget.release(held)

    # -- endpoints -----------------------------------------------------------------------------

    async def generate(self, request: Request, chat: bool) -> Response:
        try:
            self.authorize(request)
            parsed = await self._parse_body(request, chat)
            req = parsed.request
            self.check_model(req.model)
            gateway = self._ready_gateway()
            request_id = (request.headers.get("x-request-id")
                          or (req.request_id if "request_id" in req.model_fields_set else "")
                          or uuid.uuid4().hex)
            request_id_var.set(request_id)
            token_text = await self.token_text() if parsed.sampling.logprobs is not None else None
            stream = gateway.generate(parsed.prompt, parsed.sampling, parsed.processor_kwargs,
                                      request_id=request_id)
            render = (_ChatRender if chat else _CompletionRender)(
                req, ("chatcmpl-" if chat else "cmpl-") + request_id, self.served_model_name,
                token_text)
            if not req.stream:
                try:
                    out = await _unless_disconnected(_drain(stream), request)
                finally:
                    await stream.aclose()
                return Response(render.response(out).model_dump_json(),
                                media_type="application/json")
            try:  # errors before the first token are HTTP errors
                first = await _unless_disconnected(anext(stream, None), request)
            except BaseException:
                await stream.aclose()
                raise
            return StreamingResponse(
                _events(render, first, stream), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        except _ClientGone:
            log.info("client disconnected; generation cancelled")
            return Response(status_code=499)
        except VlmError as e:
            log.info("%s -> %d %s: %s", request.url.path, e.http_status, e.reason, e.details())
            return error_response(e)
        except Exception as e:  # noqa: BLE001 - the one edge where everything maps
            log.exception("%s: unexpected error", request.url.path)
            return error_response(Internal(f"internal error: {type(e).__name__}: {e}"))

    def models(self) -> ModelList:
        max_len = self.gateway.model_info().max_model_len if self.gateway is not None else None
        return ModelList(data=[ModelCard(
            id=self.served_model_name, root=self.model, owned_by="vlm", max_model_len=max_len
        )])

    def health(self) -> tuple[int, dict[str, Any]]:
        statuses = self.replicas.statuses() if self.replicas is not None else []
        serving = not self.stopping and self.gateway is not None and self.gateway.serving
        if self.stopping:
            state = "shutting_down"
        elif self.gateway is None:
            state = "warming_up"
        else:
            state = "serving" if serving else "not_serving"
        body = {
            "status": state,
            "model": self.served_model_name,
            "replicas": [
                {"address": s.address, "target": s.target, "state": s.state.value,
                 "reason": s.reason, "in_flight": s.in_flight}
                for s in statuses
            ],
        }
        return (200 if serving else 503), body


async def _events(render: _Render, first: types.Chunk | None,
                  stream: AsyncIterator[types.Chunk]) -> AsyncIterator[str]:
    """The SSE body; closing it (client gone, server stop) closes the gateway's stream."""
    try:
        start = render.stream_start()
        if start:
            yield start
        chunk = first
        while chunk is not None:
            event = render.stream_chunk(chunk)
            if event is not None:
                yield event
            chunk = await anext(stream, None)
        tail = render.stream_usage()
        if tail is not None:
            yield tail
        yield "data: [DONE]\n\n"
    except VlmError as e:
        log.info("stream failed after it started: %s %s", e.reason, e.details())
        yield f"data: {error_body(e).model_dump_json()}\n\n"
    except Exception as e:  # noqa: BLE001
        log.exception("stream failed after it started")
        yield f"data: {error_body(Internal(f'internal error: {type(e).__name__}')).model_dump_json()}\n\n"
    finally:
        await stream.aclose()


class _Render:
    """Chunks → one endpoint's response objects: the whole response, or the SSE events."""

    stream_model: type[ChatCompletionStreamResponse] | type[CompletionStreamResponse]
    stream_object: str
    stream_choice: type[ChatCompletionResponseStreamChoice] | type[CompletionResponseStreamChoice]

    def __init__(self, req: Any, response_id: str, model: str, token_text: TokenText | None) -> None:
        self.id = response_id
        self.model = model
        self.created = int(time.time())
        self.token_text = token_text
        self.return_token_ids = bool(req.return_token_ids)
        opts = req.stream_options
        self.include_usage = bool(opts is not None and opts.include_usage)
        self.out = _Output()

    def response(self, out: _Output) -> BaseModel:
        raise NotImplementedError

    def _content(self, chunk: types.Chunk) -> dict[str, Any]:
        """The endpoint's choice fields for one chunk's text and logprobs."""
        raise NotImplementedError

    def _event(self, choices: list[Any], **fields: Any) -> str:
        if self.include_usage:  # OpenAI: every chunk has "usage", null but on the last
            fields.setdefault("usage", None)
        return _sse(self.stream_model(
            id=self.id, object=self.stream_object, created=self.created, model=self.model,
            choices=choices, **fields,
        ))

    def stream_start(self) -> str | None:
        return None

    def stream_chunk(self, chunk: types.Chunk) -> str | None:
        self.out.add(chunk)
        wanted = (chunk.text or chunk.finish_reason or chunk.logprobs
                  or (self.return_token_ids and chunk.token_ids))
        if not wanted:
            return None
        finish, stop_reason = _finish(chunk)
        choice = dict(index=0, finish_reason=finish, **self._content(chunk))
        if finish is not None:
            choice["stop_reason"] = stop_reason
        if self.return_token_ids:
            choice["token_ids"] = list(chunk.token_ids)
        return self._event([self.stream_choice(**choice)])

    def stream_usage(self) -> str | None:
        if not self.include_usage:
            return None
        last = self.out.last
        return self._event([], usage=_usage(last.usage if last else None, len(self.out.token_ids)))


class _ChatRender(_Render):
    stream_model = ChatCompletionStreamResponse
    stream_object = "chat.completion.chunk"
    stream_choice = ChatCompletionResponseStreamChoice

    def _logprobs(self, positions: Iterable[types.PositionLogprobs]) -> ChatCompletionLogProbs | None:
        return None if self.token_text is None else _chat_logprobs(positions, self.token_text)

    def response(self, out: _Output) -> ChatCompletionResponse:
        finish, stop_reason = _finish(out.last)
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model,
            choices=[ChatCompletionResponseChoice(
                index=0,
                message=AssistantMessage(role="assistant", content="".join(out.text)),
                logprobs=self._logprobs(out.logprobs),
                finish_reason=finish, stop_reason=stop_reason,
                token_ids=out.token_ids if self.return_token_ids else None,
            )],
            usage=_usage(out.last.usage if out.last else None, len(out.token_ids)),
        )

    def stream_start(self) -> str:
        return self._event([ChatCompletionResponseStreamChoice(
            index=0, delta=DeltaMessage(role="assistant", content=""), logprobs=None,
            finish_reason=None)])

    def _content(self, chunk: types.Chunk) -> dict[str, Any]:
        return dict(delta=DeltaMessage(content=chunk.text), logprobs=self._logprobs(chunk.logprobs))


class _CompletionRender(_Render):
    stream_model = CompletionStreamResponse
    stream_object = "text_completion"
    stream_choice = CompletionResponseStreamChoice

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._offset = 0  # text_offset of the next token, across chunks

    def _logprobs(self, positions: Iterable[types.PositionLogprobs]) -> CompletionLogProbs | None:
        if self.token_text is None:
            return None
        lp = _completion_logprobs(positions, self.token_text, self._offset)
        self._offset += sum(len(t) for t in lp.tokens)
        return lp

    def response(self, out: _Output) -> CompletionResponse:
        finish, stop_reason = _finish(out.last)
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model,
            choices=[CompletionResponseChoice(
                index=0, text="".join(out.text), logprobs=self._logprobs(out.logprobs),
                finish_reason=finish, stop_reason=stop_reason,
                token_ids=out.token_ids if self.return_token_ids else None,
            )],
            usage=_usage(out.last.usage if out.last else None, len(out.token_ids)),
        )

    def _content(self, chunk: types.Chunk) -> dict[str, Any]:
        return dict(text=chunk.text, logprobs=self._logprobs(chunk.logprobs))


# ----------------------------------------------------------------------------- app + metrics


class _Edge:
    """Pure ASGI middleware in front of the app: at most `max_concurrent` generation requests at
    once, streams included (beyond: 429 at once, as the gRPC port's RESOURCE_EXHAUSTED; with
    the body limit this bounds the memory requests can pin), and per-route metrics in the
    service's Prometheus registry."""

    def __init__(self, app: Any, registry: CollectorRegistry | None, max_concurrent: int | None) -> None:
        self.app = app
        self.max_concurrent = max_concurrent
        self.in_flight = 0
        self.requests = Counter(
            f"{METRICS_PREFIX}_http_requests", "HTTP requests handled, by route and status.",
            ["path", "status"], registry=registry)
        self.duration = Histogram(
            f"{METRICS_PREFIX}_http_request_duration_seconds",
            "Wall time of HTTP requests (streams: until the last event), by route.",
            ["path"], registry=registry)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        path = path if path in _ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        status = 500
        started = time.monotonic()

        async def send_and_note(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        limited = path in _GENERATE_ROUTES
        try:
            if limited and self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
                busy = ResourceExhausted(
                    f"{self.in_flight} generation requests in flight, the most this server "
                    "takes at once; retry later")
                await error_response(busy)(scope, receive, send_and_note)
                return
            self.in_flight += limited
            try:
                await self.app(scope, receive, send_and_note)
            finally:
                self.in_flight -= limited
        finally:
            self.requests.labels(path, str(status)).inc()
            self.duration.labels(path).observe(time.monotonic() - started)


def create_app(front: FrontDoor) -> FastAPI:
    app = FastAPI(title="vlm gateway (OpenAI-compatible)", docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        body = ErrorResponse(error=ErrorInfo(
            message=str(exc.detail), type="NOT_FOUND" if exc.status_code == 404 else "INVALID_ARGUMENT",
            param=None, code=exc.status_code))
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await front.generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await front.generate(request, chat=False)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            front.authorize(request)
        except VlmError as e:
            return error_response(e)
        return Response(front.models().model_dump_json(), media_type="application/json")

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> Response:
        try:
            front.authorize(request)
            front.check_model(model_id)
        except VlmError as e:
            return error_response(e)
        return Response(front.models().data[0].model_dump_json(), media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        status, body = front.health()
        return JSONResponse(body, status_code=status)

    return app


# ----------------------------------------------------------------------------- the server


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: SIGTERM/SIGINT stay with the gRPC server's
    handler (`GrpcApp.serve_until_signal`), which stops this server with it."""

    @contextlib.contextmanager
    def capture_signals(self):  # noqa: ANN201
        yield


def body_limit(max_message_bytes: int) -> int:
    """The HTTP body limit for a gRPC message limit: media travel base64-encoded (4/3 the
    bytes) in JSON, plus room for the rest of the request."""
    return max_message_bytes * 4 // 3 + (1 << 20)


def ssl_context(security: Any) -> ssl.SSLContext:
    """A TLS server context from a `vlm.security.ServerSecurity` (PEM bytes): its certificate
    and key, and with a client CA, client certificates required (mTLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # The ssl module loads a certificate chain from files only: a private temporary directory.
    with tempfile.TemporaryDirectory(prefix="vlm-tls-") as tmp:
        cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert.write_bytes(security.cert)
        key.touch(mode=0o600)
        key.write_bytes(security.key)
        ctx.load_cert_chain(cert, key)
    if security.client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=security.client_ca.decode())
    return ctx


def load_tokenizer(config: Any) -> Any:
    """The model's tokenizer as vLLM loads it, for logprob tokens (`config`: a ProcessorConfig)."""
    from vllm.tokenizers.registry import get_tokenizer

    return get_tokenizer(config.tokenizer or config.model, trust_remote_code=config.trust_remote_code,
                         revision=config.revision)


class OpenAIHttpServer:
    """The FastAPI app under uvicorn, as a task on the running event loop.

    `await start()` binds (port 0 picks one; `port` tells which) and answers at once: 503 until
    `attach(gateway)`. `await stop(grace)` refuses new connections and gives open requests up
    to `grace` seconds before cancelling them (their generations are cancelled too).
    """

    def __init__(
        self,
        *,
        model: str,
        served_model_name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        replicas: Any = None,
        registry: CollectorRegistry | None = None,
        max_body_bytes: int = 256 << 20,
        tokenizer_loader: Callable[[], Any] | None = None,
        api_key: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_concurrent: int | None = None,
        budget: Any = None,
    ) -> None:
        self.front = FrontDoor(model, served_model_name or model, replicas, max_body_bytes,
                               tokenizer_loader, api_key, budget)
        self.app = create_app(self.front)
        self.host = host
        self._requested_port = port
        self._ssl = ssl_context
        self._edge = _Edge(self.app, registry, max_concurrent)
        self.port: int | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    def attach(self, gateway: Any) -> None:
        """Serve generation requests through a warmed-up gateway."""
        self.front.gateway = gateway

    @property
    def in_flight(self) -> int:
        """Generation requests being handled (streams until their last event)."""
        return self._edge.in_flight

    def _bind(self) -> socket.socket:
        family, kind, proto, _, addr = socket.getaddrinfo(
            self.host, self._requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        except BaseException:
            sock.close()
            raise
        return sock

    async def start(self) -> int:
        sock = self._bind()  # OSError here (port taken) reaches the caller as is
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._edge, loop="none", lifespan="off", ws="none",
            log_config=None, access_log=False, server_header=False, timeout_graceful_shutdown=10.0,
        )
        config.load()
        config.ssl = self._ssl  # uvicorn builds its own only from files; this one is in memory
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="openai-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        log.info("OpenAI-compatible %s on %s:%s (model %r%s)", "HTTPS" if self._ssl else "HTTP",
                 self.host, self.port, self.front.served_model_name,
                 ", API key required" if self.front.api_key else "")
        return self.port

    async def stop(self, grace: float = 10.0) -> None:
        """Idempotent."""
        self.front.stopping = True
        if self._task is None or self._server is None:
            return
        # uvicorn reports a zero timeout as exceeded even with nothing open: a floor.
        self._server.config.timeout_graceful_shutdown = max(grace, 0.1)
        self._server.should_exit = True
        task, self._task = self._task, None
        await asyncio.gather(task, return_exceptions=True)
