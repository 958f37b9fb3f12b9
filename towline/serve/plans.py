"""From a parsed request to checked work: every check that can fail on the request happens
here, before it queues for a model, so a bad request gets its 4xx at once; what is left
(:attr:`Plan.work`) runs in the request's thread with the model locks held.

>>> prompt_request([Message(role="system", content="Be brief."), Message(role="user", content="2+2?"),
...                 Message(role="assistant", content="4"), Message(role="user", content="3+3?")])
PromptRequest(question='3+3?', system='Be brief.', question_prefix='', context='', answer_start='', history=(Turn(role='user', content='2+2?'), Turn(role='assistant', content='4')))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from towline.api import Aligned
from towline.methods.base import OptionError
from towline.models.base import SEED_LIMIT, Sampling
from towline.models.local import LocalModel
from towline.prompts import BuiltPrompt, PromptRequest, Turn, build_prompt
from towline.serve import engine
from towline.serve.engine import Delta, Finish, Job, Watched, Words
from towline.serve.protocol import MAX_CHOICES, ApiError, ChatRequest, CompletionRequest, Message

DEFAULT_TEMPERATURE = 1.0
"""A request that names no temperature samples at 1, as OpenAI and vLLM do (composites
keep the sampling they were composed with)."""


@dataclass
class Plan:
    """Checked work for one request. ``work(job)`` sends :class:`Delta` and :class:`Finish`
    items and returns ``{"completion_tokens": ..., "prompt_tokens": ...}``."""

    work: Callable[[Job], dict[str, int]]
    logprobs: int | None = None
    """How many alternatives to report per token, or None for no log-probs."""
    hidden_stop: str | None = None
    """A stop added by the server (the chat template's end of turn), not reported as a stop string."""
    composite: bool = False


def plan_completion(model: LocalModel, words: Words, body: CompletionRequest) -> Plan:
    """``/v1/completions`` on a local model."""
    prompts = body.prompts
    _check_choices(len(prompts), body.n)
    max_tokens = body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise ApiError("max_tokens must be at least 1 (0 is only for echo=true, to score the prompt)",
                       param="max_tokens")
    lengths = []
    for i, prompt in enumerate(prompts):
        length = len(words.encode(prompt))
        if not length:
            raise ApiError(f"prompt{f' {i}' if len(prompts) > 1 else ''} is empty: send some text", param="prompt")
        check_room(model, length, max_tokens, "prompt")
        lengths.append(length)
    sampling = _sampling(body, DEFAULT_TEMPERATURE)
    _check_min_tokens(body.min_tokens, max_tokens, sampling)
    top = body.logprobs or 0

    def work(job: Job) -> dict[str, int]:
        generated = 0
        for p, prompt in enumerate(prompts):
            scored = engine.prompt_steps(model, prompt, top_logprobs=top) if body.echo and body.logprobs is not None \
                else None
            for c in range(body.n):
                index = p * body.n + c
                if body.echo:
                    first, steps = scored if scored else (None, [])
                    job.send(Delta(index, prompt, [None, *steps] if scored else [], echo=True, first=first))
                if max_tokens == 0:
                    job.send(Finish(index, "length"))
                    continue
                generated += engine.generate(model, prompt, index=index, max_tokens=max_tokens,
                                             sampling=choice_sampling(sampling, c), top_logprobs=top,
                                             stops=body.stop, min_tokens=body.min_tokens, job=job)[0]
        return {"completion_tokens": generated, "prompt_tokens": sum(lengths)}

    return Plan(work, logprobs=body.logprobs)


def plan_chat(model: LocalModel, words: Words, body: ChatRequest) -> Plan:
    """``/v1/chat/completions`` on a local model: the chat through the model's own template."""
    if body.top_logprobs and not body.logprobs:
        raise ApiError("top_logprobs needs logprobs=true", param="top_logprobs")
    _check_choices(1, body.n)
    built = chat_prompt(model, body.messages)
    length = len(words.encode(built.text))
    max_tokens = body.budget
    if max_tokens is None:  # as vLLM: whatever room the context leaves
        max_tokens = model.context_length - length if model.context_length else 256
        if max_tokens < 1:
            raise ApiError(f"the messages are {length} tokens, which fills the {model.context_length}-token "
                           f"context of the model: shorten them", param="messages")
    if max_tokens == 0:
        raise ApiError("max_tokens must be at least 1", param="max_tokens")
    check_room(model, length, max_tokens, "messages")
    sampling = _sampling(body, DEFAULT_TEMPERATURE)
    _check_min_tokens(body.min_tokens, max_tokens, sampling)
    end = built.end_of_turn
    stops = body.stop + ([end] if end and end not in body.stop else [])
    top = body.top_logprobs or 0

    def work(job: Job) -> dict[str, int]:
        generated = 0
        for c in range(body.n):
            generated += engine.generate(model, built.text, index=c, max_tokens=max_tokens,
                                         sampling=choice_sampling(sampling, c), top_logprobs=top, stops=stops,
                                         min_tokens=body.min_tokens, job=job)[0]
        return {"completion_tokens": generated, "prompt_tokens": length}

    return Plan(work, logprobs=top if body.logprobs else None, hidden_stop=end)


def plan_composite(name: str, aligned: Aligned, body: CompletionRequest | ChatRequest,
                   requests: list[PromptRequest], max_tokens: int | None) -> Plan:
    """Either endpoint on an aligned composite: each prompt (or the chat) is one
    :class:`PromptRequest` answered by the method; its text streams as the method reports it."""
    if getattr(body, "logprobs", None) or getattr(body, "echo", False):
        raise ApiError(f"{name} is an aligned composite: its text comes from several models, so it reports no "
                       "log-probs and no echo; ask one of its models for them", param="logprobs")
    if body.stop:
        raise ApiError(f"{name} is an aligned composite: stop strings are not supported (the method decides "
                       "where the answer ends)", param="stop")
    if body.min_tokens:
        raise ApiError(f"{name} is an aligned composite: min_tokens is not supported", param="min_tokens")
    _check_choices(len(requests), body.n)
    try:
        method = aligned.method if max_tokens is None else dataclasses.replace(aligned.method, max_tokens=max_tokens)
    except OptionError as error:
        raise ApiError(str(error), param=error.option) from None
    given = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "seed") if getattr(body, k) is not None}
    if "top_k" in given:
        given["top_k"] = max(given["top_k"], 0)  # vLLM's -1 is "off", towline's 0
    roles = {role.name: role for role in type(method).roles}
    participants = {}
    for role, part in aligned.participants.items():
        try:
            participants[role] = dataclasses.replace(part, sampling=dataclasses.replace(part.sampling, **given))
        except ValueError as error:
            raise ApiError(str(error)) from None
        for request in requests:  # a template that refuses the chat is the request's fault: say so now
            try:
                build_prompt(request, chat=roles[role].chat, template=part.template,
                             model_template=part.model.chat_template)
            except Exception as error:
                raise ApiError(f"messages: the {role} model's chat template refused them: {error}",
                               param="messages") from None
    counted_role = type(method).roles[0].name  # the model whose tokens count the output

    def work(job: Job) -> dict[str, int]:
        prompt_tokens = generated = 0
        for p, request in enumerate(requests):
            for c in range(body.n):
                index = p * body.n + c
                watched = {role: dataclasses.replace(part, model=Watched(part.model, job),
                                                     sampling=choice_sampling(part.sampling, c))
                           for role, part in participants.items()}

                def on_text(piece: str, role: str, index: int = index) -> None:
                    if piece:
                        job.send(Delta(index, piece, role=role))

                result = method.run(request, watched, on_text=on_text)
                if result.stop_reason == "error":
                    raise MethodFailed(f"{name}: a model failed mid-answer: {result.error}")
                summary = {k: v for k, v in result.to_dict().items() if k not in ("prompts", "templates")}
                job.send(Finish(index, result.stop_reason, extra=summary))
                generated += result.tokens
            prompt_tokens += participants[counted_role].model.count_tokens(result.prompts[counted_role])
        return {"completion_tokens": generated, "prompt_tokens": prompt_tokens}

    return Plan(work, composite=True)


class MethodFailed(RuntimeError):
    """A composite's model failed while answering (HTTP 502; a stream gets an error event
    after the text already sent)."""


def prompt_request(messages: list[Message]) -> PromptRequest:
    """A chat as towline's request: the leading system messages are the system text, the
    last message (the user's) is the question, and the messages between are the history."""
    system: list[str] = []
    rest = list(messages)
    while rest and rest[0].role in ("system", "developer"):
        system.append(rest.pop(0).text)
    if not rest:
        raise ApiError("messages: the chat needs a user message after the system messages", param="messages")
    if any(m.role in ("system", "developer") for m in rest):
        raise ApiError("messages: system messages must come before the first user or assistant message",
                       param="messages")
    if rest[-1].role != "user":
        raise ApiError(f"messages: the last message must be the user's, got an {rest[-1].role} message",
                       param="messages")
    return PromptRequest(question=rest[-1].text, system="\n\n".join(system),
                         history=tuple(Turn(m.role, m.text) for m in rest[:-1]))


def chat_prompt(model: LocalModel, messages: list[Message]) -> BuiltPrompt:
    """The chat rendered by the model's own template, as methods render it for a chat role."""
    request = prompt_request(messages)
    if not model.chat_template:
        raise ApiError(f"the model {model.name} has no chat template, so it cannot take chat messages: "
                       "send a prompt to /v1/completions instead", param="messages")
    try:
        return build_prompt(request, chat=True, model_template=model.chat_template)
    except Exception as error:  # the model's own template refused the conversation
        raise ApiError(f"messages: the chat template of {model.name} refused them: {error}",
                       param="messages") from None


def check_room(model: LocalModel, prompt_tokens: int, max_tokens: int, what: str) -> None:
    """The prompt and the answer's budget must fit the context (OpenAI's wording)."""
    limit = model.context_length
    if limit is not None and prompt_tokens + max_tokens > limit:
        raise ApiError(f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {what}, {max_tokens} in "
                       f"the completion). Please reduce the length of the {what} or completion.",
                       param="max_tokens")


def choice_sampling(sampling: Sampling, choice: int) -> Sampling:
    """Choice ``choice`` of a seeded request draws from ``seed + choice``: the choices differ,
    and choice 0 is what the same request with ``n=1`` gives."""
    if sampling.seed is None or choice == 0:
        return sampling
    return dataclasses.replace(sampling, seed=(sampling.seed + choice) % SEED_LIMIT)


def _sampling(body: Any, default_temperature: float) -> Sampling:
    try:
        return Sampling(temperature=default_temperature if body.temperature is None else body.temperature,
                        top_p=1.0 if body.top_p is None else body.top_p,
                        top_k=max(body.top_k or 0, 0), seed=body.seed)
    except ValueError as error:
        raise ApiError(str(error)) from None


def _check_min_tokens(min_tokens: int, max_tokens: int, sampling: Sampling) -> None:
    if not min_tokens:
        return
    if not sampling.greedy:
        raise ApiError("min_tokens is supported for greedy decoding only (temperature 0)", param="min_tokens")
    if min_tokens > max_tokens:
        raise ApiError(f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})", param="min_tokens")


def _check_choices(prompts: int, n: int) -> None:
    if prompts * n > MAX_CHOICES:
        raise ApiError(f"{prompts} prompt(s) times n={n} is more than {MAX_CHOICES} choices: split the request",
                       param="n")
