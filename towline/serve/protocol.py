"""The wire format: requests as vLLM's OpenAI-compatible server reads them, responses in its
shapes, and errors as OpenAI-style bodies.

Requests are checked strictly: a wrong type is an error, not a conversion (``"max_tokens":
"16"`` is refused), and a known parameter this server cannot honour is refused unless it
has its neutral value (``presence_penalty: 0`` passes, ``presence_penalty: 0.5`` does not),
so a client never gets an answer computed differently from what it asked for. Unknown
parameters are ignored, as vLLM and OpenAI ignore them.

>>> request = parse(CompletionRequest, b'{"model": "m", "prompt": "Hi", "max_tokens": 4}')
>>> request.prompts, request.max_tokens, request.temperature
(['Hi'], 4, None)
>>> parse(CompletionRequest, b'{"model": "m", "prompt": "Hi", "max_tokens": "4"}')
Traceback (most recent call last):
towline.serve.protocol.ApiError: max_tokens: must be an integer, got "4"
>>> parse(ChatRequest, b'{"model": "m", "messages": []}')
Traceback (most recent call last):
towline.serve.protocol.ApiError: messages: must hold at least one message
>>> completion_logprobs([Step(Token(" a", -0.5), (Token(" a", -0.5), Token(" b", -1.5)))], top=1)
{'text_offset': [0], 'token_logprobs': [-0.5], 'tokens': [' a'], 'top_logprobs': [{' a': -0.5}]}
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from towline.models.base import SEED_LIMIT, Step, Token

MAX_LOGPROBS = 20
"""Most alternatives per position a request may ask for (vLLM's default ``max_logprobs``)."""
MAX_CHOICES = 16
"""Most choices one request may ask for (prompts times ``n``)."""
MAX_STOPS = 16
LOGPROB_FLOOR = -9999.0
"""What vLLM reports instead of ``-inf``, which JSON cannot carry."""

UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    # parameter -> its neutral values (sending one of them is fine)
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "repeat_penalty": (None, 1, 1.0),  # llama.cpp's name; towline's own client sends 1.0
    "min_p": (None, 0, 0.0),
    "use_beam_search": (None, False),
    "ignore_eos": (None, False),
    "prompt_logprobs": (None,),
    "stop_token_ids": (None, []),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "include_stop_str_in_output": (None, False),
    "continue_final_message": (None, False),
    "add_generation_prompt": (None, True),
}
"""Parameters vLLM knows that this server does not implement."""


class ApiError(Exception):
    """A request this server refuses: HTTP ``status`` with an OpenAI-style error body."""

    KINDS = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
             405: "MethodNotAllowedError", 413: "RequestTooLargeError", 499: "ClientClosedRequest",
             500: "InternalServerError", 502: "BadGatewayError", 503: "ServiceUnavailableError"}

    def __init__(self, message: str, status: int = 400, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.counted = False
        """Whether the metrics have counted the request already."""

    def body(self) -> dict[str, Any]:
        """The error as vLLM writes it: ``{"error": {message, type, param, code}}``."""
        return {"error": {"message": self.message, "type": self.KINDS.get(self.status, "Error"),
                          "param": self.param, "code": self.status}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class _Request(BaseModel):
    # strict: no silent conversions ("16" is not 16); NaN and infinities are refused.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_tokens: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: str | list[str] | None = Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's and vLLM's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("must hold at least one prompt")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[Message]) -> list[Message]:
        if not value:
            raise ValueError("must hold at least one message")
        return value

    @property
    def budget(self) -> int | None:
        """``max_completion_tokens``, else the older ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM): a ``prompt``, or chat ``messages`` rendered by the model's template."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    tokens: list[int]


# -- reading a request ----------------------------------------------------------------------

_EXPECTED = {
    "prompt": "a string or a non-empty list of strings (token ids are not taken: send text)",
    "stop": "a string or a list of non-empty strings",
    "messages": "a non-empty list of {role, content} messages",
    "content": "a string or a list of {type: text, text} parts",
    "role": "one of system, developer, user, assistant",
}
_TYPE_WORDS = {"int_type": "an integer", "int_parsing": "an integer", "float_type": "a number",
               "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
               "model_type": "an object", "dict_type": "an object", "finite_number": "a finite number"}


def parse(cls: type[_Request] | type[BaseModel], body: bytes) -> Any:
    """Read a JSON request body into ``cls``; :class:`ApiError` (400) saying what is wrong."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:
        raise ApiError(f"the request body is not valid JSON ({error}): send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(data).__name__}")
    for name, neutral in UNSUPPORTED.items():
        if name in data and data[name] not in neutral:
            raise ApiError(f"{name}={json.dumps(data[name])[:80]} is not supported by towline serve; "
                           f"leave it out", param=name)
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise ApiError(_describe(error), param=_first_field(error)) from None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _first_field(error: ValidationError) -> str | None:
    loc = error.errors()[0]["loc"]
    return str(loc[0]) if loc else None


def _describe(error: ValidationError) -> str:
    """One line per wrong field, in the request's terms (``messages.0.role: must be ...``)."""
    lines: dict[str, str] = {}
    for problem in error.errors():
        path = [str(p) for p in problem["loc"] if not _is_type_label(p)]
        if path and path[0] in ("prompt", "stop"):
            path = path[:1]  # one message for the whole field, whichever union member failed
        where = ".".join(path) or "body"
        if where in lines:
            continue
        got = problem.get("input")
        shown = json.dumps(got)[:60] if _jsonable(got) else repr(got)[:60]
        field = next((p for p in reversed(path) if not p.isdigit()), "")
        kind, limits = problem["type"], problem.get("ctx", {})
        if kind == "missing":
            lines[where] = f"{where}: is required"
        elif kind == "value_error":
            lines[where] = f"{where}: {problem['msg'].removeprefix('Value error, ')}"
        elif kind in _BOUNDS:
            word, key = _BOUNDS[kind]
            lines[where] = f"{where}: must be {word} {limits[key]}, got {shown}"
        elif field in _EXPECTED:
            lines[where] = f"{where}: must be {_EXPECTED[field]}, got {shown}"
        elif kind in _TYPE_WORDS:
            lines[where] = f"{where}: must be {_TYPE_WORDS[kind]}, got {shown}"
        else:
            lines[where] = f"{where}: {problem['msg'][0].lower()}{problem['msg'][1:]}, got {shown}"
    return "; ".join(lines.values())


_BOUNDS = {"greater_than_equal": ("at least", "ge"), "less_than_equal": ("at most", "le"),
           "greater_than": ("greater than", "gt"), "less_than": ("less than", "lt"),
           "too_long": ("at most this long:", "max_length")}


def _is_type_label(part: object) -> bool:
    # pydantic names the union member it tried ("str", "list[str]") inside the location.
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part
                                      or part in ("TextPart", "Message", "StreamOptions"))


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# -- responses ------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR) if not math.isnan(value) else LOGPROB_FLOOR


def completion_logprobs(steps: Sequence[Step | None], *, top: int, first: Token | None = None,
                        offset: int = 0) -> dict[str, list]:
    """vLLM's completion ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs`` (the
    taken token and the ``top`` best, keyed by text) and ``text_offset`` (where each token's
    text starts, counting from ``offset``). A ``None`` step is a position without a log-prob:
    the prompt's first token when echoing, whose text is ``first``."""
    out: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    position = offset
    for step in steps:
        if step is None:
            token_text, logprob, alternatives = (first.text if first else ""), None, None
        else:
            token_text, logprob = step.token.text, _logprob(step.token.logprob)
            alternatives = {step.token.text: logprob}
            for alternative in step.top[:top]:
                alternatives.setdefault(alternative.text, _logprob(alternative.logprob))
        out["text_offset"].append(position)
        out["token_logprobs"].append(logprob)
        out["tokens"].append(token_text)
        out["top_logprobs"].append(alternatives)
        position += len(token_text)
    return out


def chat_logprobs(steps: Sequence[Step], *, top: int) -> dict[str, list]:
    """OpenAI's chat ``logprobs``: per token its text, log-prob, UTF-8 bytes and the ``top`` best."""
    def entry(token: Token) -> dict[str, Any]:
        return {"token": token.text, "logprob": _logprob(token.logprob), "bytes": list(token.text.encode())}

    return {"content": [{**entry(s.token), "top_logprobs": [entry(t) for t in s.top[:top]]} for s in steps]}


FINISH_REASONS = {"end": "stop", "stop": "stop", "length": "length"}
"""towline's finish reasons in OpenAI's words (the end of text and a stop string are both "stop")."""
