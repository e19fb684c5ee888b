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
from ..engine.state import TokenLogprob
from ..sampling import MAX_LOGPROBS, MAX_N, MIN_TEMPERATURE, SEED_RANGE, SamplingParams, StructuredOutput

MAX_STOP = 4  # stop strings a request may give (OpenAI's bound)
MAX_STOP_CHARS = 256
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


class JSONSchemaFormat(BaseModel):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: "text", "json_object" or "json_schema" (with its schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of choice, regex, json (a schema) or grammar (EBNF)."""

    model_config = ConfigDict(extra="forbid")
    choice: Optional[list[str]] = None
    regex: Optional[str] = None
    json_: Optional[Union[dict[str, Any], str]] = Field(default=None, alias="json")
    grammar: Optional[str] = None


class ChatCompletionRequest(BaseModel):
    """The fields vpt_fast honours (OpenAI's, and vLLM's `structured_outputs`,
    `include_stop_str_in_output`, `stop_token_ids`, `top_k`); others that would change the
    answer (tools, logit_bias) are refused rather than ignored. Fields it does not know are
    ignored, as vLLM does, with a logged warning, and listed in the response's
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
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    vpt_mode: Optional[Literal["region", "reencode", "free"]] = None
    vpt_force: Optional[str] = None

    UNSUPPORTED: ClassVar[dict[str, Any]] = {"tools": None, "tool_choice": None, "functions": None,
                                             "function_call": None, "logit_bias": None}

    @model_validator(mode="after")
    def _refuse_what_is_not_done(self) -> "ChatCompletionRequest":
        extra = self.model_extra or {}
        for name, default in self.UNSUPPORTED.items():
            value = extra.get(name, default)
            if value not in (default, [], {}, ""):
                raise ValueError(f"{name} is not supported by vpt_fast")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.response_format is not None and self.response_format.type == "json_schema" and (
                self.response_format.json_schema is None or self.response_format.json_schema.schema_ is None):
            raise ValueError("a json_schema response_format needs json_schema.schema")
        if self.structured_outputs is not None:
            given = [k for k, v in self.structured_outputs.model_dump(by_alias=True).items() if v is not None]
            if len(given) != 1:
                raise ValueError(f"structured_outputs takes exactly one of choice, regex, json, grammar; got "
                                 f"{', '.join(given) or 'none'}")
            if self.response_format is not None and self.response_format.type != "text":
                raise ValueError("give response_format or structured_outputs, not both")
        return self

    def structured(self) -> tuple[StructuredOutput | None, str | None]:
        """(the answer's constraint, the field that gave it), or (None, None)."""
        if self.structured_outputs is not None:
            so = self.structured_outputs
            for kind, value, field in (("choice", so.choice, "choice"), ("regex", so.regex, "regex"),
                                       ("json_schema", so.json_, "json"), ("grammar", so.grammar, "grammar")):
                if value is not None:
                    return StructuredOutput(kind, value), f"structured_outputs.{field}"
        if self.response_format is not None and self.response_format.type == "json_object":
            return StructuredOutput("json_object"), "response_format"
        if self.response_format is not None and self.response_format.type == "json_schema":
            return StructuredOutput("json_schema", self.response_format.json_schema.schema_), "response_format"
        return None, None

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
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        common = dict(max_new_tokens=limit, stop=stops, include_stop_str_in_output=self.include_stop_str_in_output,
                      stop_token_ids=tuple(self.stop_token_ids or ()), presence_penalty=self.presence_penalty,
                      frequency_penalty=self.frequency_penalty, n=self.n, structured=self.structured()[0],
                      logprobs=(self.top_logprobs or 0) if self.logprobs else None, seed=self.seed)
        if temperature == 0:
            return SamplingParams(**common), []
        warned = []
        if temperature < MIN_TEMPERATURE:
            warned.append(f"temperature {temperature!r} is below {MIN_TEMPERATURE}: raised to {MIN_TEMPERATURE}")
            temperature = MIN_TEMPERATURE
        return SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=self.top_p, **common), warned

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


def usage_json(results: list[GenerationResult]) -> dict[str, int]:
    """Usage of a request's answers: the prompt once, the tokens of every answer."""
    prompt = results[0].prompt_tokens
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "spliced_visual_tokens": sum(t.tokens_spliced for r in results for t in r.trace)}


def shown_logprobs(result: GenerationResult, eos: int) -> list[TokenLogprob]:
    """The log-probabilities of the tokens behind a choice's content: those of its last round
    (the answer after a perception, else round 1), an ending stop token left out."""
    if result.logprobs is None:
        return []
    shown = result.answer_ids if result.trace else result.round1_ids
    entries = result.logprobs[len(result.logprobs) - len(shown):] if shown else []
    if shown and result.finish_reason == "stop" and (shown[-1] == eos or shown[-1] == result.stop_reason):
        entries = entries[:-1]
    return entries


class LogprobWriter:
    """OpenAI's logprobs objects from TokenLogprobs: each token as its text and UTF-8 bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            text = self._text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def entry(self, e: TokenLogprob) -> dict[str, Any]:
        text = self.token(e.token_id)
        return {"token": text, "logprob": e.logprob, "bytes": list(text.encode("utf-8")),
                "top_logprobs": [{"token": self.token(t), "logprob": v, "bytes": list(self.token(t).encode("utf-8"))}
                                 for t, v in e.top]}

    def content(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        return {"content": [self.entry(e) for e in entries]}


class Completion:
    """Ids and the creation time shared by one request's response or chunks."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def response(self, results: list[GenerationResult], round1_texts: list[str], notes: dict[str, list[str]] | None,
                 logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The response to a request: a choice per answer (by index)."""
        choices = []
        for k, result in enumerate(results):
            choice = {"index": k, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": FINISH.get(result.finish_reason, "stop"), "stop_reason": result.stop_reason,
                      "logprobs": logprobs[k] if logprobs is not None else None,
                      "vpt": vpt_json(result, round1_texts[k], notes)}
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage_json(results)}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, index: int = 0, **extra) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, **extra}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}

    def usage_chunk(self, results: list[GenerationResult]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage_json(results)}


def error_json(message: str, status: int, kind: str | None = None, param: str | None = None) -> dict[str, Any]:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}
    return {"error": {"message": message, "type": kind or kinds.get(status, "server_error"), "param": param,
                      "code": status}}
