"""The OpenAI request bodies herd accepts, its error shape, and messages -> herd's chat format.

Bodies are parsed strictly (a string where a number belongs is a 400, not a guess); fields herd
does not know are ignored, as clients send many. Every error is an `APIError`, answered as
`{"error": {"message", "type", "param", "code"}}`, the shape the `openai` client parses.
"""

from __future__ import annotations

import base64
import binascii
import json

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = None  # None, 0 or -1: no limit
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (load tests)

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"stop holds {len(stop)} strings; at most 4 are allowed", param="stop")
        return stop


class ChatCompletionRequest(_Sampling):
    messages: list[dict] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(_Body):
    prompt: str | None = None
    messages: list[dict] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    tokens: list[int]


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "ipython", "ipython": "ipython"}


def to_herd_messages(messages: list[dict], max_images: int) -> list[dict]:
    """OpenAI chat messages -> herd.chat's messages; images as bytes decoded from data: URLs."""
    out, images = [], 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, f"{where} must be an object with a role among {', '.join(ROLES)}", param=where)
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    images += 1
                    if images > max_images:
                        raise APIError(400, f"more than {max_images} images in one request", param=where)
                    image = decode_image_url(part.get("image_url"), f"{where}.content[{j}]")
                    parts.append({"type": "image", "image": image})
                else:
                    raise APIError(400, f"{where}.content[{j}] must be a text or image_url part", param=where)
            content = parts
        elif content is not None and not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string, a list of parts or null", param=where)
        herd_message = {"role": ROLES[message["role"]], "content": content}
        if message.get("tool_calls"):
            herd_message["tool_call"] = _tool_call_code(message, where)
        out.append(herd_message)
    return out


def _tool_call_code(message: dict, where: str) -> str:
    """The code of an assistant message's one tool call (Llama 4's python tool, as herd answers it:
    arguments {"code": ...}; other arguments are passed on as their JSON text)."""
    calls = message["tool_calls"]
    if message["role"] != "assistant" or not isinstance(calls, list) or len(calls) != 1:
        raise APIError(400, f"{where}.tool_calls: Llama 4's format takes one tool call, on an assistant message",
                       param=where)
    arguments = calls[0].get("function", {}).get("arguments") if isinstance(calls[0], dict) else None
    if not isinstance(arguments, str):
        raise APIError(400, f"{where}.tool_calls[0].function.arguments must be a JSON string", param=where)
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        raise APIError(400, f"{where}.tool_calls[0].function.arguments is not valid JSON", param=where) from None
    return parsed["code"] if isinstance(parsed, dict) and isinstance(parsed.get("code"), str) else arguments


def decode_image_url(image_url, where: str) -> bytes:
    """The bytes of a `data:` URL. Remote URLs are refused: the server fetches nothing."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise APIError(400, f"{where}.image_url.url must be a string (a data: URL)", param=where)
    if not url.startswith("data:"):
        raise APIError(400, f"{where}: only data: URLs are accepted (data:image/png;base64,...); the server "
                       "does not fetch remote images", param=where, code="remote_image_refused")
    header, _, payload = url[5:].partition(",")
    if not header.endswith(";base64"):
        raise APIError(400, f"{where}: the data: URL must be base64-encoded (data:image/...;base64,...)", param=where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the data: URL's base64 payload is malformed", param=where) from None
