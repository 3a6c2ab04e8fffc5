"""The OpenAI-compatible API's wire format: request checking, response and stream-chunk bodies, errors.

Requests are parsed from the raw body here (strict JSON types), so every mistake becomes a 400 in OpenAI's error
shape that names the field (`param`, e.g. `messages[2].content`) and says why, never a framework's own format.
Fields clients commonly send and that change nothing here (`user`, `metadata`, `store`, penalties...) are
accepted and ignored; fields whose meaning this server cannot honour (`n` > 1, tools, images, logprobs, a JSON
response format) are refused by name.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_MESSAGES = 4_096
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_MODEL_NAME_CHARS = 256
MAX_EMBEDDING_INPUTS = 2_048
INT64 = 2**63
RAG_PREFIX = "rag:"  # retrieval: the chunks closest to the question as the context
PINNED_PREFIX = "pinned:"  # long context: the collection's whole documents as the context
FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "repetition": "stop", "length": "length",
                  "context_window": "length"}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    TYPES: ClassVar[dict[int, str]] = {400: "invalid_request_error", 401: "invalid_request_error",
                                       404: "invalid_request_error", 413: "invalid_request_error",
                                       503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields: accepted, ignored (see the module docstring)


class _Message(_Request):
    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[Any] | None = None


class _StreamOptions(_Request):
    include_usage: bool = False


class _ResponseFormat(_Request):
    type: str


class _ChatRequest(_Request):
    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)
    messages: list[_Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    stream_options: _StreamOptions | None = None
    n: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    function_call: Any = None
    response_format: _ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class _EmbeddingRequest(_Request):
    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)


@dataclass
class ChatRequest:
    """A checked chat completion request. `messages`: role (system, user or assistant) and text content."""

    model: str
    messages: list[dict[str, str]]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def collection(self) -> str | None:
        """The collection of a `rag:` or `pinned:` model name, else None (a plain chat with the model)."""
        for prefix in (RAG_PREFIX, PINNED_PREFIX):
            if self.model.startswith(prefix):
                return self.model[len(prefix):]
        return None

    @property
    def pinned(self) -> bool:
        return self.model.startswith(PINNED_PREFIX)


@dataclass
class EmbeddingRequest:
    model: str
    inputs: list[str] = field(default_factory=list)
    encoding_format: str = "float"
    dimensions: int | None = None


def _param(loc: tuple) -> str:
    """A pydantic error location as a JSON path: ("messages", 2, "content") -> "messages[2].content"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]", "list[dict[str,any]]", "function-after"):
            continue  # which member of a union failed: not a field name
        else:
            out += f".{part}" if out else str(part)
    return out


def _validated(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise OpenAIError(400, f"the request body is not valid JSON: {first['msg']}",
                              code="invalid_json") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise OpenAIError(400, "the request body must be a JSON object", code="invalid_request") from None
        param = _param(tuple(first["loc"]))
        if first["type"] == "missing":
            message = f"'{param}' is required"
        elif param.endswith(".content"):
            message = f"invalid '{param}': give a string or a list of text parts"
        else:
            message = f"invalid '{param}': {first['msg']}"
        raise OpenAIError(400, message, param=param, code="invalid_value") from None


def _text_content(index: int, message: _Message) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        where = f"messages[{index}].content[{j}]"
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_image", "image", "input_audio", "file"):
            raise OpenAIError(400, f"{where}: {kind} parts are not supported: this server's models read text only",
                              param=where, code="unsupported_content")
        else:
            raise OpenAIError(400, f"{where}: a content part must be {{\"type\": \"text\", \"text\": ...}}",
                              param=where, code="invalid_value")
    return "\n".join(texts)


def parse_chat_request(body: bytes) -> ChatRequest:
    """Check a `/v1/chat/completions` body. Raises OpenAIError (400) naming the field at fault."""
    raw: _ChatRequest = _validated(_ChatRequest, body)
    if raw.n not in (None, 1):
        raise OpenAIError(400, f"n={raw.n}: one choice per request only (send the request again for another)",
                          param="n", code="unsupported_value")
    for name in ("tools", "functions"):
        if getattr(raw, name):
            raise OpenAIError(400, f"'{name}': tool and function calling are not supported by this server",
                              param=name, code="unsupported_parameter")
    for name in ("tool_choice", "function_call"):
        if getattr(raw, name) not in (None, "none", "auto"):
            raise OpenAIError(400, f"'{name}': tool and function calling are not supported by this server",
                              param=name, code="unsupported_parameter")
    if raw.response_format is not None and raw.response_format.type != "text":
        raise OpenAIError(400, f"response_format {raw.response_format.type!r}: only plain text answers are "
                               "supported", param="response_format.type", code="unsupported_value")
    if raw.logprobs or raw.top_logprobs:
        raise OpenAIError(400, "'logprobs': log probabilities are not returned by this server", param="logprobs",
                          code="unsupported_parameter")
    stops = [raw.stop] if isinstance(raw.stop, str) else list(raw.stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise OpenAIError(400, f"'stop': at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters",
                          param="stop", code="invalid_value")
    messages = []
    for index, message in enumerate(raw.messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise OpenAIError(400, f"messages[{index}].role {message.role!r}: the roles are system (or developer), "
                                   "user and assistant (tool messages are not supported)",
                              param=f"messages[{index}].role", code="invalid_value")
        if message.tool_calls:
            raise OpenAIError(400, f"messages[{index}].tool_calls: tool calling is not supported by this server",
                              param=f"messages[{index}].tool_calls", code="unsupported_parameter")
        messages.append({"role": role, "content": _text_content(index, message)})
    top_p = raw.top_p
    if top_p == 0:
        top_p = 1e-9  # OpenAI accepts 0: keep the most likely token only
    return ChatRequest(
        model=raw.model, messages=messages, stream=raw.stream,
        include_usage=bool(raw.stream_options and raw.stream_options.include_usage),
        max_tokens=raw.max_completion_tokens if raw.max_completion_tokens is not None else raw.max_tokens,
        temperature=raw.temperature, top_p=top_p, stop=tuple(s for s in stops if s), seed=raw.seed,
    )


def parse_embedding_request(body: bytes) -> EmbeddingRequest:
    """Check a `/v1/embeddings` body. Raises OpenAIError (400) naming the field at fault."""
    raw: _EmbeddingRequest = _validated(_EmbeddingRequest, body)
    inputs = [raw.input] if isinstance(raw.input, str) else list(raw.input)
    if not inputs:
        raise OpenAIError(400, "'input' is empty: give a string or a list of strings", param="input",
                          code="invalid_value")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise OpenAIError(400, f"'input' has {len(inputs)} items; at most {MAX_EMBEDDING_INPUTS} per request",
                          param="input", code="invalid_value")
    for index, item in enumerate(inputs):
        if not isinstance(item, str):
            raise OpenAIError(400, f"input[{index}]: token ids are not accepted here; send the text",
                              param=f"input[{index}]", code="invalid_value")
        if not item.strip():
            raise OpenAIError(400, f"input[{index}] is empty", param=f"input[{index}]", code="invalid_value")
    return EmbeddingRequest(model=raw.model, inputs=inputs, encoding_format=raw.encoding_format,
                            dimensions=raw.dimensions)


# ----- responses -----------------------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(metrics: dict) -> dict:
    """OpenAI's usage object from an ask's metrics; cached tokens = tokens restored from the factor cache."""
    prompt, completion = int(metrics["prompt_tokens"]), int(metrics.get("new_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": int(metrics.get("reused_tokens", 0))}}


def public_sources(sources: list[dict]) -> list[dict]:
    """The extension field `sources`: what each `[n]` marker of the answer cites."""
    return [{"ref": s.get("ref"), "file": s.get("path"), "start_line": s.get("start_line"),
             "end_line": s.get("end_line"), "score": s.get("score"), "text": s.get("text")} for s in sources]


def _extensions(sources: list[dict] | None, left_out: list[str] | None) -> dict:
    if sources is None:
        return {}
    return {"sources": public_sources(sources), "left_out": list(left_out or [])}


def completion_body(cid: str, model: str, fingerprint: str, result: Any, rag: bool) -> dict:
    """A `chat.completion` object for an `AskResult`."""
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer, "refusal": None},
                     "logprobs": None, "finish_reason": FINISH_REASONS.get(result.finish_reason, "stop")}],
        "usage": usage(result.metrics),
        **_extensions(result.sources if rag else None, result.left_out),
    }


def chunk_body(cid: str, model: str, fingerprint: str, created: int, *, delta: dict | None = None,
               finish_reason: str | None = None, usage_body: dict | None = None,
               sources: list[dict] | None = None, left_out: list[str] | None = None) -> dict:
    """A `chat.completion.chunk`: a delta, the final chunk (finish reason, extensions) or the usage chunk."""
    choices = [] if usage_body is not None else [
        {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": fingerprint, "choices": choices}
    if usage_body is not None:
        body["usage"] = usage_body
    body.update(_extensions(sources, left_out))
    return body


def sse(data: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def embedding_body(model: str, vectors: np.ndarray, encoding_format: str, prompt_tokens: int) -> dict:
    """A `list` of `embedding` objects; base64 = the float32 little-endian bytes, as OpenAI sends them."""
    data = []
    for index, row in enumerate(np.asarray(vectors, dtype="<f4")):
        value: Any = base64.b64encode(row.tobytes()).decode() if encoding_format == "base64" else row.tolist()
        data.append({"object": "embedding", "index": index, "embedding": value})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
