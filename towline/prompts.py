"""Prompts: one request, rendered for each model (docs/prompts.md).

A :class:`PromptRequest` holds the parts of a question; :func:`build_prompt` turns it into the
text one model sees -- plain text for a base model, a chat template for a chat model -- and
reports which template it used and the string that ends an assistant turn there (methods use
it as a stop string).

Chat templates are Jinja strings rendered the way Hugging Face ``apply_chat_template`` does
(sandboxed, ``trim_blocks``/``lstrip_blocks``, a ``raise_exception`` global), without
importing transformers. ``FAMILIES`` holds the built-in templates by name, ``ALIASES`` the
other names some families go by:

>>> sorted(FAMILIES)
['chatml', 'gemma-it', 'llama-2-chat', 'llama-3', 'olmo', 'qwen', 'smollm']
>>> ALIASES["qwen"]
'chatml'

>>> req = PromptRequest(question="What is 2+2?", system="Be brief.", question_prefix="Question: ")
>>> build_prompt(req, chat=False).text
'Be brief.\\nQuestion: What is 2+2?\\n'
>>> p = build_prompt(req, chat=True, template="chatml")
>>> print(p.text)
<|im_start|>system
Be brief.<|im_end|>
<|im_start|>user
Question: What is 2+2?<|im_end|>
<|im_start|>assistant
<BLANKLINE>
>>> p.template, p.end_of_turn
('family:chatml', '<|im_end|>')
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ALIASES", "FAMILIES", "BuiltPrompt", "PromptRequest", "Turn", "build_prompt", "check_template"]

ROLES = ("user", "assistant")
"""The roles of earlier turns (the system text has its own field)."""


@dataclass(frozen=True)
class Turn:
    """One earlier message of a conversation, taken verbatim.

    >>> Turn("assistant", "4")
    Turn(role='assistant', content='4')
    >>> Turn("tool", "{}")
    Traceback (most recent call last):
    ValueError: a turn's role must be 'user' or 'assistant', got 'tool'
    """

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"a turn's role must be 'user' or 'assistant', got {self.role!r}")
        if not isinstance(self.content, str):
            raise ValueError(f"a turn's content must be a string, got {type(self.content).__name__}")


@dataclass(frozen=True)
class PromptRequest:
    """The parts of one question, shared by every model's prompt.

    ``context`` goes before ``question_prefix`` with no separator (end it with a newline
    yourself, e.g. ``"Subject: math\\n"``); ``answer_start`` is the text the answer begins with.
    ``history`` holds the earlier turns of a conversation, oldest first, each a :class:`Turn`
    (or a ``{"role": ..., "content": ...}`` dict); they are rendered verbatim before the
    question, which is always the last user turn. ``question_prefix``, ``context`` and
    ``answer_start`` apply to the question and its answer only.

    >>> PromptRequest(question="Why?", question_prefix="Q: ").question_prefix
    'Q: '
    >>> PromptRequest(question="And 3+3?", history=[{"role": "user", "content": "2+2?"},
    ...                                            {"role": "assistant", "content": "4"}]).history[1]
    Turn(role='assistant', content='4')
    """

    question: str
    system: str = ""
    question_prefix: str = ""
    context: str = ""
    answer_start: str = ""
    history: tuple[Turn, ...] = ()

    def __post_init__(self) -> None:
        # A tuple of frozen turns keeps the request immutable and hashable.
        turns = tuple(t if isinstance(t, Turn) else Turn(**t) if isinstance(t, dict) else Turn(*t)
                      for t in self.history)
        object.__setattr__(self, "history", turns)


@dataclass(frozen=True)
class BuiltPrompt:
    """A rendered prompt.

    ``text`` is what to send to the model; ``template`` says which template made it
    (``"plain"``, ``"family:<name>"``, ``"model's own chat template"`` or ``"custom"``);
    ``end_of_turn`` is the string ending an assistant turn in that template (a stop string),
    or None for plain text or when it could not be told.

    >>> build_prompt(PromptRequest(question="Hi"), chat=False)
    BuiltPrompt(text='Hi\\n', template='plain', end_of_turn=None)
    """

    text: str
    template: str
    end_of_turn: str | None


# Built-in families, as Jinja chat templates reproducing each official template.
# None of them writes the BOS text (<s>, <|begin_of_text|>, <bos>): local tokenizers add BOS
# themselves for these models, and writing it too would give a doubled BOS. OLMo keeps its
# leading <|endoftext|>: OLMo tokenizers have no BOS token and add nothing, and the official
# template writes it. Families without a system role raise on one, like the official
# templates do; build_prompt then merges the system text into the user turn.
# Each entry: family name -> (Jinja template, the string that ends an assistant turn).
_BUILTIN: dict[str, tuple[str, str]] = {
    "llama-2-chat": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}{% set content = message['content'] %}"
        "{% if loop.first and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + content %}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ ('' if loop.first else '<s>') + '[INST] ' + content | trim + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content | trim + ' </s>' }}{% endif %}"
        "{% endfor %}",
        "</s>",
    ),
    "llama-3": (
        "{% for message in messages %}{{ '<|start_header_id|>' + message['role']"
        " + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}",
        "<|eot_id|>",
    ),
    "gemma-it": (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
        "<end_of_turn>",
    ),
    "olmo": (
        "<|endoftext|>{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '<|assistant|>\\n' + message['content'] + '<|endoftext|>\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
        "<|endoftext|>",
    ),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "<|im_end|>",
    ),
}

# Other names for a family (SmolLM/SmolLM2 and Qwen speak ChatML).
ALIASES: dict[str, str] = {"smollm": "chatml", "qwen": "chatml"}

# Built-in chat templates by family name, aliases included, as Jinja strings.
# The ChatML family adds no default system prompt (SmolLM2's and Qwen's own templates do).
FAMILIES: dict[str, str] = {
    name: _BUILTIN[ALIASES.get(name, name)][0] for name in [*_BUILTIN, *ALIASES]
}

_NAMES = ", ".join(sorted(FAMILIES))  # for error messages
_PROBE = "TOWLINE-END-OF-TURN-PROBE"


def build_prompt(
    request: PromptRequest,
    *,
    chat: bool,
    template: str | None = None,
    model_template: str | None = None,
    bos_token: str = "",
    eos_token: str = "",
) -> BuiltPrompt:
    """Render ``request`` for one model.

    ``chat=False`` (a base model) gives plain text
    ``{system}\\n{context}{question_prefix}{question}\\n{answer_start}``; when ``system`` is
    empty the leading ``{system}\\n`` is left out entirely (no stray empty line). Earlier
    turns (``history``) come between the system text and the question, each turn's text on
    its own line(s) and verbatim, with no role labels: a transcript, in the same unlabelled
    style as the question itself (write labels such as ``"User: "`` into the turns when a base
    model needs them).

    ``chat=True`` uses ``model_template`` (the Jinja chat template from the model's tokenizer)
    when given, else the built-in family named by ``template``. The system text gets a system
    turn when the template has one; a template that raises on a system message (or drops its
    text) gets it merged into the user turn as ``{system}\\n{context}{question_prefix}{question}``
    (into the first user turn when there is ``history``). Earlier turns are the template's
    user and assistant messages, before the question's user turn. The assistant turn is
    opened and ``answer_start`` follows it directly.

    ``template`` overrides the model's template, whatever ``chat`` says: a family name or alias
    (see :data:`FAMILIES`), ``"plain"``, or a Jinja string (it contains ``{%`` or ``{{``).
    ``bos_token``/``eos_token`` are passed to Jinja templates that reference them (the family
    templates do not). For a model's own or a custom template, ``end_of_turn`` is read from a
    rendered example conversation: the text right after the assistant's message, up to the
    next newline, stripped; None if that is empty or the template cannot render one.

    >>> req = PromptRequest(question="Hi?", system="Be kind.", answer_start="Sure,")
    >>> build_prompt(req, chat=True, template="gemma-it").text
    '<start_of_turn>user\\nBe kind.\\nHi?<end_of_turn>\\n<start_of_turn>model\\nSure,'
    >>> build_prompt(req, chat=True, template="plain").text
    'Be kind.\\nHi?\\nSure,'
    >>> own = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\\n{% endfor %}[assistant] "
    >>> p = build_prompt(req, chat=True, model_template=own)
    >>> p.text, p.template, p.end_of_turn
    ('[system] Be kind.\\n[user] Hi?\\n[assistant] Sure,', "model's own chat template", None)
    >>> build_prompt(req, chat=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: chat=True needs a chat template: pass template= a family name (chatml, ...

    A conversation: the earlier turns, then the question.

    >>> talk = PromptRequest(question="And 3+3?", system="Be brief.",
    ...                      history=[Turn("user", "2+2?"), Turn("assistant", "4")])
    >>> build_prompt(talk, chat=False).text
    'Be brief.\\n2+2?\\n4\\nAnd 3+3?\\n'
    >>> build_prompt(talk, chat=True, template="gemma-it").text
    '<start_of_turn>user\\nBe brief.\\n2+2?<end_of_turn>\\n<start_of_turn>model\\n4<end_of_turn>\\n<start_of_turn>user\\nAnd 3+3?<end_of_turn>\\n<start_of_turn>model\\n'
    """
    if template and ("{%" in template or "{{" in template):
        jinja, label, end = template, "custom", None
    elif template and template.lower() != "plain":
        name = ALIASES.get(template.lower(), template.lower())
        if name not in _BUILTIN:
            raise ValueError(
                f"unknown template {template!r}: use 'plain', a family name "
                f"({_NAMES}) or a Jinja chat-template string"
            )
        jinja, label, end = _BUILTIN[name][0], f"family:{name}", _BUILTIN[name][1]
    elif template or not chat:
        return BuiltPrompt(_plain(request), "plain", None)
    elif model_template:
        jinja, label, end = model_template, "model's own chat template", None
    else:
        raise ValueError(
            f"chat=True needs a chat template: pass template= a family name ({_NAMES}) "
            "or a Jinja chat-template string, or model_template= the tokenizer's template"
        )
    tokens = {"bos_token": bos_token, "eos_token": eos_token}
    text = _render_request(jinja, request, tokens)
    if end is None:
        end = _infer_end_of_turn(jinja, tokens)
    return BuiltPrompt(text + request.answer_start, label, end)


def check_template(template: str) -> None:
    """Refuse a template that cannot work, before any model loads: an unknown family name, a
    Jinja string that does not compile, or one that fails on a one-question conversation.

    >>> check_template("chatml"); check_template("plain")
    >>> check_template("{% for m in messages %}{{ m.content }}")
    Traceback (most recent call last):
    ValueError: the Jinja template does not compile (line 1: Unexpected end of template. Jinja was looking for the following tags: 'endfor' or 'else'. The innermost block that needs to be closed is 'for'.)
    >>> check_template("{{ messages[0].content.upper(1, 2) }}")
    Traceback (most recent call last):
    ValueError: the Jinja template fails on a one-question conversation (TypeError: str.upper() takes no arguments (2 given))
    """
    if "{%" in template or "{{" in template:
        try:
            _compile(template)
        except jinja2.TemplateSyntaxError as error:
            raise ValueError(f"the Jinja template does not compile (line {error.lineno}: {error.message})") from None
        try:
            _render(template, [{"role": "user", "content": "Hi"}])
        except Exception as error:  # a template can raise anything Python can
            raise ValueError(f"the Jinja template fails on a one-question conversation "
                             f"({type(error).__name__}: {error})") from None
    elif template.lower() != "plain" and ALIASES.get(template.lower(), template.lower()) not in _BUILTIN:
        raise ValueError(f"unknown template {template!r}: use 'plain', a family name ({_NAMES}) "
                         "or a Jinja chat-template string")


def _plain(request: PromptRequest) -> str:
    lines = ([request.system] if request.system else []) + [t.content for t in request.history]
    return "\n".join([*lines, _question_text(request)]) + "\n" + request.answer_start


def _question_text(request: PromptRequest) -> str:
    return f"{request.context}{request.question_prefix}{request.question}"


def _messages(request: PromptRequest, *, system: str) -> list[dict[str, str]]:
    """The conversation as chat messages: ``system`` (the system text, or "" for none) has a
    system turn; the earlier turns and the question follow."""
    turns = [{"role": t.role, "content": t.content} for t in request.history]
    turns.append({"role": "user", "content": _question_text(request)})
    return ([{"role": "system", "content": system}] if system else []) + turns


def _render_request(jinja: str, request: PromptRequest, tokens: dict[str, str]) -> str:
    """The chat prompt up to the opened assistant turn (answer_start not yet added).

    A system turn is kept only if the template renders it without raising and actually uses
    it (some templates silently drop system messages); otherwise the system text is merged
    into the first user turn.
    """
    if request.system:
        try:
            text = _render(jinja, _messages(request, system=request.system), **tokens)
        except Exception:  # e.g. raise_exception('System role not supported')
            pass
        else:
            if request.system.strip() in text and text != _render(jinja, _messages(request, system=""), **tokens):
                return text
    messages = _messages(request, system="")
    if request.system:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = f"{request.system}\n{first_user['content']}"
    return _render(jinja, messages, **tokens)


def _infer_end_of_turn(jinja: str, tokens: dict[str, str]) -> str | None:
    """What a template writes right after an assistant message, up to a newline; or None."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = _render(jinja, messages, **tokens, add_generation_prompt=False)
    except Exception:
        return None
    if _PROBE not in text:
        return None
    end = text.split(_PROBE, 1)[1].split("\n", 1)[0].strip()
    return end or None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=64)
def _compile(jinja: str) -> jinja2.Template:
    # The environment transformers uses for chat templates.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(jinja)


def _render(jinja: str, messages: list[dict[str, str]], **variables: object) -> str:
    """Render a chat template; the assistant turn is opened unless told otherwise."""
    variables.setdefault("add_generation_prompt", True)
    return _compile(jinja).render(messages=messages, **variables)
