"""A request's output in vLLM's response shapes: collected into one response, or as stream
chunks, from the :class:`~towline.serve.engine.Delta` and
:class:`~towline.serve.engine.Finish` items its work sends.

Composites add one field that standard clients ignore: ``towline`` on each choice (the
method's result: ``guide_token_fraction``, ``stop_reason``, ``rounds``, ...; in a stream,
on the last chunk of each choice, with the final ``text``), and ``towline: {"role": ...}``
on each streamed piece, saying which model wrote it.
"""

from __future__ import annotations

from typing import Any

from towline.serve.engine import Delta, Finish
from towline.serve.plans import Plan
from towline.serve.protocol import FINISH_REASONS, chat_logprobs, completion_logprobs, new_id, now, usage


class Shape:
    def __init__(self, *, chat: bool, model: str, plan: Plan) -> None:
        self.chat = chat
        self.model = model
        self.plan = plan
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self._texts: dict[int, list[str]] = {}
        self._steps: dict[int, list] = {}
        self._firsts: dict[int, Any] = {}
        self._offsets: dict[int, int] = {}
        self._finishes: dict[int, Finish] = {}
        self._opened: set[int] = set()
        self.guide_shares: list[float] = []

    # -- one response ---------------------------------------------------------------
    def add(self, item: Delta | Finish) -> None:
        """Collect one item (for a response that is not streamed)."""
        if isinstance(item, Finish):
            self._finished(item)
            return
        self._texts.setdefault(item.index, []).append(item.text)
        self._steps.setdefault(item.index, []).extend(item.steps)
        if item.first is not None:
            self._firsts[item.index] = item.first

    def response(self, counts: dict[str, int]) -> dict[str, Any]:
        choices = []
        for index in sorted(self._finishes):
            finish = self._finishes[index]
            text = "".join(self._texts.get(index, []))
            steps = self._steps.get(index, [])
            choice: dict[str, Any] = {"index": index}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text, "tool_calls": []}
                choice["logprobs"] = None if self.plan.logprobs is None else chat_logprobs(steps, top=self.plan.logprobs)
            else:
                choice["text"] = text
                choice["logprobs"] = None if self.plan.logprobs is None else completion_logprobs(
                    steps, top=self.plan.logprobs, first=self._firsts.get(index))
            choice.update(self._finish_fields(finish))
            if finish.extra is not None:
                choice["towline"] = {k: v for k, v in finish.extra.items() if k != "text"}
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": usage(counts["prompt_tokens"], counts["completion_tokens"])}

    # -- a stream -------------------------------------------------------------------
    def chunks(self, item: Delta | Finish) -> list[dict[str, Any]]:
        """The stream chunks of one item (a chat choice opens with the assistant's role)."""
        out = []
        if self.chat and item.index not in self._opened:
            out.append(self._chunk({"index": item.index, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}))
        self._opened.add(item.index)
        if isinstance(item, Finish):
            self._finished(item)
            choice = {"index": item.index, **({"delta": {}} if self.chat else {"text": ""}), "logprobs": None,
                      **self._finish_fields(item)}
            if item.extra is not None:
                choice["towline"] = item.extra
            return [*out, self._chunk(choice)]
        choice = {"index": item.index}
        if self.chat:
            choice["delta"] = {"content": item.text}
            choice["logprobs"] = None if self.plan.logprobs is None else chat_logprobs(item.steps,
                                                                                      top=self.plan.logprobs)
        else:
            choice["text"] = item.text
            choice["logprobs"] = None
            if self.plan.logprobs is not None:
                # Offsets count the token strings before, as in the response that is not streamed.
                offset = self._offsets.get(item.index, 0)
                choice["logprobs"] = completion_logprobs(item.steps, top=self.plan.logprobs, first=item.first,
                                                         offset=offset)
                self._offsets[item.index] = offset + sum(map(len, choice["logprobs"]["tokens"]))
        choice.update({"finish_reason": None, "stop_reason": None})
        if item.role is not None:
            choice["towline"] = {"role": item.role}
        return [*out, self._chunk(choice)]

    def usage_chunk(self, counts: dict[str, int]) -> dict[str, Any]:
        """The last chunk when the client asked for ``stream_options.include_usage``."""
        return {**self._chunk(None), "choices": [],
                "usage": usage(counts["prompt_tokens"], counts["completion_tokens"])}

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice] if choice else []}

    # -- both -----------------------------------------------------------------------
    def _finished(self, item: Finish) -> None:
        self._finishes[item.index] = item
        if item.extra and "guide_token_fraction" in item.extra:
            self.guide_shares.append(item.extra["guide_token_fraction"])

    def _finish_fields(self, finish: Finish) -> dict[str, Any]:
        if self.plan.composite:
            # Only the budget is "length"; the method's own ends (guide_stop, rounds, ...) are "stop".
            return {"finish_reason": "length" if finish.reason == "length" else "stop", "stop_reason": None}
        stop = finish.stop if finish.stop != self.plan.hidden_stop else None
        return {"finish_reason": FINISH_REASONS[finish.reason], "stop_reason": stop}
