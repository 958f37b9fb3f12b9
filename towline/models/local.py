"""Local weights through transformers + torch, with a KV cache.

>>> model = LocalModel.load("smollm2-135m-instruct")             # doctest: +SKIP
>>> model.complete(["The capital of France is"], max_tokens=3)[0].text   # doctest: +SKIP
' Paris.'

Decoding is our own short loop over ``model(...)`` rather than ``model.generate`` because
every method needs the distribution behind each token, a cache it can reorder, and text
hand-off at arbitrary points. For one prompt and greedy decoding it computes exactly what
``generate`` computes.

A prompt that extends the previous one (nudging asks the base about ``prompt + out + ...``
over and over) reuses the cached keys and values of the shared token prefix.
"""

from __future__ import annotations

import copy
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch

from towline.models import registry
from towline.models.local_scoring import CachedScoring
from towline.sampling import draw, warp
from towline.sampling import generator as sampling_generator
from towline.models.base import (
    GREEDY,
    Completion,
    DecodeState,
    Distribution,
    Model,
    ModelError,
    Sampling,
    Scored,
    ScoreState,
    Step,
    Token,
)

MIN_REUSED_PREFIX = 8
"""Shorter shared prefixes are recomputed: copying the cache would not pay for itself."""


@dataclass
class _CachedPrefix:
    ids: list[int]
    cache: object


class _Batch:
    """Rows decoded together: left-padded ids, attention mask, positions and KV cache."""

    def __init__(self, owner: LocalModel, rows: list[list[int]]) -> None:
        self.owner = owner
        self.fed = [list(r) for r in rows]  # ids whose keys/values are in the cache
        reused = owner._reusable_prefix(rows[0]) if len(rows) == 1 else None
        if reused is not None:
            start, self.cache = reused
            self.mask = torch.ones(1, len(rows[0]), dtype=torch.long)
            new_ids = torch.tensor([rows[0][start:]])
            positions = torch.arange(start, len(rows[0])).unsqueeze(0)
            self.last_logits = self._forward(new_ids, positions)
            return
        width = max(len(r) for r in rows)
        pad = owner.pad_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        self.mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = None
        self.last_logits = self._forward(ids, positions)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.owner.model(
                input_ids=ids.to(self.owner.device),
                attention_mask=self.mask.to(self.owner.device),
                position_ids=positions.to(self.owner.device),
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.cache = out.past_key_values
        return out.logits[:, -1, :].float().cpu()

    def append(self, ids: Sequence[int]) -> None:
        positions = self.mask.sum(-1, keepdim=True)
        self.mask = torch.cat([self.mask, torch.ones(len(ids), 1, dtype=torch.long)], dim=-1)
        self.last_logits = self._forward(torch.tensor(ids).unsqueeze(-1), positions)
        for row, token_id in zip(self.fed, ids):
            row.append(token_id)

    def reorder(self, rows: Sequence[int]) -> None:
        index = torch.tensor(list(rows))
        self.cache.reorder_cache(index.to(self.owner.device))
        self.mask = self.mask[index]
        self.last_logits = self.last_logits[index]
        self.fed = [list(self.fed[i]) for i in rows]

    def remember(self) -> None:
        """Offer this single row's cache for reuse by the next prompt that shares its prefix."""
        if len(self.fed) == 1:
            self.owner._prefix = _CachedPrefix(self.fed[0], self.cache)


class LocalModel(Model):
    """A causal LM held in memory. Build it with :meth:`load` or from a loaded model."""

    def __init__(self, model, tokenizer, *, name: str, reuse_prefix: bool = True) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.reuse_prefix = reuse_prefix
        self.chat_template = getattr(tokenizer, "chat_template", None) or None
        self.device = next(model.parameters()).device
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.end_ids = _end_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.end_ids)
        self._prefix: _CachedPrefix | None = None

    @classmethod
    def load(cls, source: str | Path, *, dtype: str = "float32", device: str = "cpu",
             reuse_prefix: bool = True) -> LocalModel:
        """Load a registry name, a ``.gguf`` file, a local directory or a Hugging Face id.

        GGUF files (registry models included) are converted to safetensors once and cached.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = str(source)
        if source in registry.REGISTRY:
            path = registry.local_weights(source)
        elif source.endswith(".gguf"):
            if not Path(source).is_file():
                raise ModelError(f"GGUF file {source} does not exist")
            path = registry.ensure_converted(Path(source))
        else:
            path = source
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
        except OSError as error:
            raise ModelError(
                f"could not load model {source!r}: {error}\nGive a registry name "
                f"({', '.join(sorted(registry.REGISTRY))}), a .gguf file, a local model directory, "
                "or a Hugging Face id (needs the Hub or its local cache)."
            ) from error
        return cls(model, tokenizer, name=source, reuse_prefix=reuse_prefix)

    # -- tokens -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, with the model's BOS unless the text already starts with it."""
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add_special).input_ids

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _reusable_prefix(self, ids: list[int]) -> tuple[int, object] | None:
        if not self.reuse_prefix or self._prefix is None:
            return None
        shared = _common_prefix_length(self._prefix.ids, ids)
        shared = min(shared, len(ids) - 1)  # the last prompt token must be fed to get logits
        if shared < MIN_REUSED_PREFIX:
            return None
        window = getattr(self.model.config, "sliding_window", None)
        if window and len(self._prefix.ids) >= window:
            return None  # sliding-window layers have dropped states that a crop would need
        cache = copy.deepcopy(self._prefix.cache)
        cache.crop(shared - len(self._prefix.ids))  # a negative crop removes that many tokens
        return shared, cache

    # -- decoding -----------------------------------------------------------------------

    def _piece(self, context: Sequence[int], token_id: int) -> str:
        """The text a token adds after ``context``. Decoding a token alone can drop its
        leading space (SentencePiece) or split a multi-byte character."""
        context = list(context[-4:])
        before = self._decode(context)
        after = self._decode(context + [token_id])
        return after[len(before):] if after.startswith(before) else self._decode([token_id])

    def _choose(self, logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
                top_logprobs: int, contexts: Sequence[Sequence[int]]) -> tuple[list[int], list[Step]]:
        """Pick one token per row and describe the distribution it came from."""
        logprobs = torch.log_softmax(warp(logits, sampling), dim=-1)
        chosen = draw(logprobs, sampling, generator)
        best = logprobs.topk(max(top_logprobs, 1), dim=-1)
        steps = []
        for row, (token_id, context) in enumerate(zip(chosen.tolist(), contexts)):
            top = tuple(Token(self._piece(context, i), lp, i)
                        for i, lp in zip(best.indices[row].tolist(), best.values[row].tolist()))
            steps.append(Step(Token(self._piece(context, token_id), logprobs[row, token_id].item(), token_id), top))
        return chosen.tolist(), steps

    def _decode_rows(self, prompts: Sequence[str], *, max_tokens: int, sampling: Sampling,
                     top_logprobs: int, stop: Sequence[str], finish: list[str | None]) -> Iterator[list[Step | None]]:
        """The decoding loop: yields, after each position, the new step of every row (None
        for rows already finished), and fills ``finish`` with each row's finish reason."""
        generator = sampling_generator(sampling)
        prompt_ids = [self.encode(p) for p in prompts]
        batch = _Batch(self, prompt_ids)
        generated: list[list[int]] = [[] for _ in prompts]
        finish[:] = [None] * len(prompts)
        try:
            for position in range(max_tokens):
                contexts = [prompt + new for prompt, new in zip(prompt_ids, generated)]
                ids, steps = self._choose(batch.last_logits, sampling, generator, top_logprobs, contexts)
                out: list[Step | None] = []
                for row, (token_id, step) in enumerate(zip(ids, steps)):
                    if finish[row] is not None:
                        out.append(None)
                    elif token_id in self.end_ids:
                        finish[row] = "end"
                        out.append(None)
                    else:
                        generated[row].append(token_id)
                        out.append(step)
                        if stop and any(s in self._decode(generated[row]) for s in stop):
                            finish[row] = "stop"
                if all(s is None for s in out):
                    break
                yield out
                if all(f is not None for f in finish) or position == max_tokens - 1:
                    break
                # Finished rows are fed a filler token; their outputs are ignored from now on.
                batch.append([g[-1] if g else self.pad_id for g in generated])
            for row in range(len(finish)):
                finish[row] = finish[row] or "length"
        finally:
            # Also when closed early (a stream read for a step or two, as nudging does): what
            # was computed is still the best prefix for the next, extended prompt.
            batch.remember()

    def complete(self, prompts: Sequence[str], *, max_tokens: int, sampling: Sampling = GREEDY,
                 top_logprobs: int = 1, stop: Sequence[str] = ()) -> list[Completion]:
        if not prompts:
            return []
        steps: list[list[Step]] = [[] for _ in prompts]
        finish: list[str | None] = ["length"] * len(prompts)
        if max_tokens > 0:
            for new in self._decode_rows(prompts, max_tokens=max_tokens, sampling=sampling,
                                         top_logprobs=top_logprobs, stop=stop, finish=finish):
                for row, step in enumerate(new):
                    if step is not None:
                        steps[row].append(step)
        completions = []
        for row_steps, reason in zip(steps, finish):
            text = self._decode([s.token.id for s in row_steps])
            if reason == "stop":
                cut = min(text.find(s) for s in stop if s in text)
                text = text[:cut]
            completions.append(Completion(text, row_steps, reason))
        return completions

    def stream(self, prompt: str, *, max_tokens: int, sampling: Sampling = GREEDY,
               top_logprobs: int = 1) -> Generator[Step, None, None]:
        rows = self._decode_rows([prompt], max_tokens=max_tokens, sampling=sampling,
                                 top_logprobs=top_logprobs, stop=(), finish=[None])
        with closing(rows):  # closing this stream closes the decoding loop at once
            for new in rows:
                if new[0] is not None:
                    yield new[0]

    def score(self, prompts: Sequence[str], continuations: Sequence[str], *,
              top_logprobs: int = 1) -> list[Scored]:
        results = []
        for prompt, continuation in zip(prompts, continuations, strict=True):
            prompt_ids = self.encode(prompt)
            full_ids = self.encode(prompt + continuation)
            # Tokens may merge across the boundary: score from the first token that differs.
            start = max(_common_prefix_length(prompt_ids, full_ids), 1)
            with torch.inference_mode():
                logits = self.model(input_ids=torch.tensor([full_ids], device=self.device),
                                    logits_to_keep=len(full_ids) - start + 1).logits[0, :-1].float().cpu()
            logprobs = torch.log_softmax(logits, dim=-1)
            best = logprobs.topk(max(top_logprobs, 1), dim=-1)
            steps = []
            for offset, token_id in enumerate(full_ids[start:]):
                context = full_ids[: start + offset]
                top = tuple(Token(self._piece(context, i), lp, i) for i, lp in
                            zip(best.indices[offset].tolist(), best.values[offset].tolist()))
                steps.append(Step(Token(self._piece(context, token_id), logprobs[offset, token_id].item(), token_id), top))
            results.append(Scored(steps))
        return results

    def open(self, prompts: Sequence[str]) -> DecodeState:
        return _LocalDecodeState(self, prompts)

    def open_scoring(self, prompts: Sequence[str]) -> ScoreState:
        """Rows scored on top of their cached prefixes (re-read in full when ``reuse_prefix`` is off)."""
        return CachedScoring(self, prompts, reuse=self.reuse_prefix)


class _LocalDecodeState(DecodeState):
    def __init__(self, model: LocalModel, prompts: Sequence[str]) -> None:
        self._model = model
        self._batch = _Batch(model, [model.encode(p) for p in prompts])
        self._texts = [""] * len(prompts)

    def next(self, *, top_logprobs: int = 20) -> list[Distribution]:
        logprobs = torch.log_softmax(self._batch.last_logits, dim=-1)
        best = logprobs.topk(top_logprobs, dim=-1)
        return [
            Distribution(
                top=tuple(Token(self._model._piece(fed, i), lp, i) for i, lp in zip(idx.tolist(), val.tolist())),
                full=row.numpy(),
            )
            for row, idx, val, fed in zip(logprobs, best.indices, best.values, self._batch.fed)
        ]

    def append(self, tokens: Sequence[Token]) -> None:
        if any(t.id is None for t in tokens):
            raise ValueError("local decoding needs token ids: append Tokens taken from this model")
        self._batch.append([t.id for t in tokens])
        self._texts = [text + t.text for text, t in zip(self._texts, tokens)]

    def reorder(self, rows: Sequence[int]) -> None:
        self._batch.reorder(rows)
        self._texts = [self._texts[i] for i in rows]

    @property
    def texts(self) -> list[str]:
        return list(self._texts)


def _end_token_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    if not ids:
        raise ModelError("the model names no end-of-text token (eos_token_id); set one in its config")
    return frozenset(ids)


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
