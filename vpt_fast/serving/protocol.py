"""The OpenAI chat-completions request, checked with pydantic, and the response objects.

VPT extensions: the request fields `vpt_mode` ("region", "reencode", "free": append the
trigger sentence the prompted models were trained with) and `vpt_force` (round-1 tokens to
script, as text with special tokens, like `vpt-fast run --force`: for evaluation and
debugging); a `vpt` object on each choice
(the engine's finish reason, the generated token ids, the round-1 text and the perception
trace: kind, grid cells, pixel boxes, tokens spliced and rolled back, milliseconds); and
`usage.spliced_visual_tokens`. In a stream, each perception is a chunk of its own whose
choice carries `vpt.perception`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..engine import GenerationResult, PerceptionTrace
from ..sampling import MIN_TEMPERATURE, SEED_RANGE, SamplingParams

SHOWN_IGNORED = 20  # ignored field names listed in a response, each cut at 64 characters

FINISH = {"stop": "stop", "length": "length"}  # anything else the engine reports is "stop" here, exact in vpt


class ImageURL(BaseModel):
    url: str
    detail: Optional[str] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "image_url"]
    text: Optional[str] = None
    image_url: Optional[Union[ImageURL, str]] = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields vpt_fast honours; others that would change the answer (tools, stop strings,
    penalties, logprobs, n > 1, ...) are refused rather than ignored. Fields it does not know
    are ignored, as vLLM does, with a logged warning, and listed in the response's
    `vpt.ignored_fields`."""

    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=-1)
    seed: Optional[int] = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    vpt_mode: Optional[Literal["region", "reencode", "free"]] = None
    vpt_force: Optional[str] = None

    UNSUPPORTED: ClassVar[dict[str, Any]] = {"tools": None, "tool_choice": None, "functions": None, "function_call": None, "stop": None,
                   "logprobs": False, "top_logprobs": None, "logit_bias": None, "response_format": None,
                   "presence_penalty": 0, "frequency_penalty": 0}

    @model_validator(mode="after")
    def _refuse_what_is_not_done(self) -> "ChatCompletionRequest":
        extra = self.model_extra or {}
        for name, default in self.UNSUPPORTED.items():
            value = extra.get(name, default)
            if value not in (default, [], {}, ""):
                raise ValueError(f"{name} is not supported by vpt_fast")
        return self

    def ignored_fields(self) -> list[str]:
        """The request's fields this server does not know (the refused ones excepted)."""
        names = sorted(k for k in (self.model_extra or {}) if k not in self.UNSUPPORTED)
        shown = [n if len(n) <= 64 else n[:64] + "..." for n in names[:SHOWN_IGNORED]]
        return shown + ([f"... {len(names) - SHOWN_IGNORED} more"] if len(names) > SHOWN_IGNORED else [])

    def sampling_params(self, default_max_tokens: int) -> tuple[SamplingParams, list[str]]:
        """(the engine's SamplingParams, warnings about values changed): the token limit bounds
        each round (round 1 and the answer); temperature 0 is greedy, one between 0 and
        MIN_TEMPERATURE is raised to it (as vLLM does: smaller ones overflow the logits); 1 is
        the default, as in OpenAI's API."""
        limit = self.max_completion_tokens or self.max_tokens or default_max_tokens
        temperature = 1.0 if self.temperature is None else self.temperature
        top_k = self.top_k if self.top_k is not None and self.top_k > 0 else None
        if temperature == 0:
            return SamplingParams(max_new_tokens=limit), []
        warned = []
        if temperature < MIN_TEMPERATURE:
            warned.append(f"temperature {temperature!r} is below {MIN_TEMPERATURE}: raised to {MIN_TEMPERATURE}")
            temperature = MIN_TEMPERATURE
        return SamplingParams(max_new_tokens=limit, do_sample=True, temperature=temperature, top_k=top_k,
                              top_p=self.top_p, seed=self.seed), warned

    def messages_as_dicts(self) -> list[dict[str, Any]]:
        out = []
        for m in self.messages:
            content = m.content
            if isinstance(content, list):
                content = [p.model_dump(exclude_none=True) for p in content]
                for part in content:
                    if isinstance(part.get("image_url"), dict):
                        part["image_url"] = part["image_url"]["url"]
            out.append({"role": m.role, "content": content})
        return out


def trace_json(t: PerceptionTrace) -> dict[str, Any]:
    return t.to_json()


def vpt_json(result: GenerationResult, round1_text: str, notes: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The `vpt` object of a choice; notes: "ignored_fields" and "warnings" about the request."""
    out = {"finish_reason": result.finish_reason, "token_ids": list(result.token_ids), "round1_text": round1_text,
           "trace": [trace_json(t) for t in result.trace]}
    if result.error:
        out["error"] = result.error
    out.update(notes or {})
    return out


def usage_json(result: GenerationResult) -> dict[str, int]:
    completion = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion,
            "spliced_visual_tokens": sum(t.tokens_spliced for t in result.trace)}


class Completion:
    """Ids and the creation time shared by one request's response or chunks."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def response(self, result: GenerationResult, round1_text: str, notes: dict[str, list[str]] | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": FINISH.get(result.finish_reason, "stop"),
                             "vpt": vpt_json(result, round1_text, notes)}],
                "usage": usage_json(result)}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, **extra) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, **extra}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}

    def usage_chunk(self, result: GenerationResult) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage_json(result)}


def error_json(message: str, status: int, kind: str | None = None, param: str | None = None) -> dict[str, Any]:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}
    return {"error": {"message": message, "type": kind or kinds.get(status, "server_error"), "param": param,
                      "code": status}}
