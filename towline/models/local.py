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

Greedy decoding of one prompt drafts ahead (:mod:`towline.models.lookup`): the pass that feeds
each chosen token also feeds the tokens a lookup guesses will follow, and every guess that
equals the model's own greedy choice is a token decoded without a pass of its own. Several
tokens in one pass cost little more than one on a GPU, and on a CPU once the linear layers are
packed (:mod:`towline.models.packed`, which :meth:`LocalModel.load` does), and the output is
plain greedy decoding's, up to floating-point rounding between pass shapes.

Answers run together (:func:`towline.models.together.run_together`, as ``towline eval
--batch-size`` runs nudging) share passes: whenever they all wait on this model, their single
rows run as one batch (:mod:`towline.models.local_merged`), and their drafts shrink, since a
pass over many rows' drafts is no longer nearly free.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import threading
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch

from towline.models import registry
from towline.models.local_merged import Feed, forward_feeds, own_cache
from towline.models.local_scoring import CachedScoring, common_prefix_length
from towline.models.lookup import lookup_draft
from towline.models.packed import pack_linear_layers
from towline.models.together import answers_together, in_together, merged_call
from towline.sampling import choose_with_logprobs
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
    row_counts,
)

MIN_REUSED_PREFIX = 8
"""Shorter shared prefixes are recomputed: copying the cache would not pay for itself."""

UNFINISHED_CHARACTER = "\ufffd"
"""What tokenizers decode the leading bytes of a character split across tokens to."""

DRAFT_SIZES = (2, 8, 16)
"""Fewest, first and most tokens drafted at once: drafts grow by two when one is wholly taken
and shrink by one when not (as transformers' assisted generation adapts its drafts), from
call to call."""


@dataclass
class _CachedPrefix:
    ids: list[int]
    cache: object


@dataclass
class _Memory:
    """What carries over from call to call."""

    prefix: _CachedPrefix | None = None
    """The cached prefix of the latest single row (:meth:`LocalModel._reusable_prefix`)."""
    draft_size: int = DRAFT_SIZES[1]
    """Tokens to draft next: how well drafts have done lately (nudging makes many short calls)."""


class _Batch:
    """Rows decoded together: left-padded ids, attention mask, positions and KV cache.

    Rows may be fed different numbers of tokens at once (:meth:`feed`) and rolled back by
    different numbers (:meth:`truncate`): a row's unused columns are masked out, and its
    positions count only its real tokens, so it computes what a fresh run on its tokens
    computes. ``recent[i]`` holds row ``i``'s logits at its last few positions (the last one
    is what it predicts next): enough to roll back within the latest feed without a forward.

    Models with a sliding window (Gemma 3) drop cached states older than the window, and
    their window spans columns, holes included: past the window, rolling back and masked
    holes would give wrong results, so they raise :class:`ModelError` instead.
    """

    def __init__(self, owner: LocalModel, rows: list[list[int]], *, keep: int = 1) -> None:
        """Read ``rows`` in one forward pass, keeping the logits of each row's last ``keep``
        positions in ``recent`` (more than one: a prompt read together with a draft)."""
        self.owner = owner
        # Rows of one prompt (a search's candidates) read it once, then copy its cache.
        read = rows[:1] if all(r == rows[0] for r in rows) else rows
        self._read(read, keep)
        if len(read) < len(rows):
            self.reorder([0] * len(rows))

    def _read(self, rows: list[list[int]], keep: int) -> None:
        """The forward pass over ``rows`` (left-padded), or over what a single row adds to a
        cached prefix it shares with an earlier call."""
        self.fed = [list(r) for r in rows]  # ids whose keys/values are in the cache
        reused = self.owner._reusable_prefix(rows[0], keep) if len(rows) == 1 else None
        if reused is not None:
            start, self.cache = reused
            self.mask = torch.ones(1, len(rows[0]), dtype=torch.long)
            new_ids = torch.tensor([rows[0][start:]])
            positions = torch.arange(start, len(rows[0])).unsqueeze(0)
            self.recent = [list(self._forward(new_ids, positions, keep)[0])]
            return
        width = max(len(r) for r in rows)
        pad = self.owner.pad_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        self.mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = None
        self.recent = [list(row) for row in self._forward(ids, positions, keep)]

    @property
    def last_logits(self) -> torch.Tensor:
        """Every row's next-token logits, one row each."""
        return torch.stack([r[-1] for r in self.recent])

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """Run the new columns ``ids`` on top of the cache; the logits of the last ``keep``.

        A single row goes through :func:`merged_call`: answers run together
        (:func:`~towline.models.together.run_together`) share one pass."""
        feed = Feed(ids, self.mask, positions, self.cache, keep)
        if feed.mergeable:
            logits, self.cache = merged_call(self.owner, feed, functools.partial(forward_feeds, self.owner))
        else:
            logits, self.cache = self.owner._forward_one(feed)
        return logits

    def append(self, ids: Sequence[int]) -> None:
        self.feed([[token_id] for token_id in ids])

    def feed(self, rows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Feed ``rows[i]`` to row ``i`` (any number of tokens each, in one forward pass);
        returns each row's logits after each of its new tokens."""
        width = max(len(r) for r in rows)
        if width == 0:
            return [torch.empty(0, self.recent[i][-1].shape[-1]) for i in range(len(rows))]
        pad = self.owner.pad_id
        ids = torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows])
        new_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        mask = torch.cat([self.mask, new_mask], dim=-1)
        if not self.owner._within_window(mask.shape[-1]) and ((mask.cumsum(-1) > 0) & (mask == 0)).any():
            # A sliding window spans columns: a masked hole inside it would hide a real token.
            raise ModelError(f"model {self.owner.name} attends through a sliding window of "
                             f"{self.owner.sliding_window} tokens, which rows fed or rolled back by "
                             "different numbers of tokens cannot keep exact past that length: feed "
                             "and roll back every row alike")
        # A row's positions continue from its count of real tokens, whatever holes it has.
        positions = self.mask.sum(-1, keepdim=True) + (new_mask.cumsum(-1) - 1).clamp(min=0)
        self.mask = mask
        logits = self._forward(ids, positions, keep=width)
        out = []
        for i, row in enumerate(rows):
            new = logits[i, : len(row)]
            out.append(new)
            if len(row):
                self.recent[i] = self.recent[i][-1:] + list(new)
                self.fed[i].extend(row)
        return out

    def truncate(self, counts: Sequence[int]) -> None:
        """Roll back the last ``counts[i]`` tokens of row ``i`` (the caller keeps prompts).

        The rolled-back columns are masked out, and columns that no row uses any more are
        cut off the end of the cache. A row rolled back past its latest feed gets its new
        last token fed again, to know what it predicts there."""
        # One column more: a row rolled back past its latest feed is fed a token again.
        if any(counts) and not self.owner._within_window(self.mask.shape[-1] + 1):
            raise ModelError(f"model {self.owner.name} attends through a sliding window of "
                             f"{self.owner.sliding_window} tokens and its cache keeps only the "
                             f"latest: rows of {self.mask.shape[-1]} tokens cannot be rolled back")
        refeed: list[list[int]] = [[] for _ in counts]
        for i, count in enumerate(counts):
            if not count:
                continue
            if count < len(self.recent[i]):
                self.recent[i] = self.recent[i][:-count]
            else:
                count += 1
                refeed[i] = [self.fed[i][-count]]
                self.recent[i] = []
            columns = self.mask[i].nonzero().squeeze(-1)[-count:]
            self.mask[i, columns] = 0
            del self.fed[i][-count:]
        unused = int((self.mask.sum(0).flip(0).cumsum(0) == 0).sum())
        if unused:
            self.cache.crop(-unused)
            self.mask = self.mask[:, :-unused]
        if any(refeed):
            self.feed(refeed)

    def reorder(self, rows: Sequence[int]) -> None:
        index = torch.tensor(list(rows))
        self.cache = own_cache(self.cache)
        self.cache.reorder_cache(index.to(self.owner.device))
        self.mask = self.mask[index]
        self.recent = [list(self.recent[i]) for i in rows]
        self.fed = [list(self.fed[i]) for i in rows]

    def remember(self) -> None:
        """Offer this single row's cache for reuse by the next prompt that shares its prefix."""
        if len(self.fed) == 1:
            self.owner._memory.prefix = _CachedPrefix(self.fed[0], self.cache)

    def close(self) -> None:
        self.cache = None
        self.recent = []


class LocalModel(Model):
    """A causal LM held in memory. Build it with :meth:`load` or from a loaded model."""

    merges_calls = True

    def __init__(self, model, tokenizer, *, name: str, reuse_prefix: bool = True, draft: bool = True) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.reuse_prefix = reuse_prefix
        self.draft = draft
        """Whether greedy decoding of one prompt verifies lookup drafts (see the module's
        docstring); off, every token costs its own forward pass."""
        self._shared_memory = _Memory()
        self._answer_memory = threading.local()
        self.chat_template = getattr(tokenizer, "chat_template", None) or None
        self.device = next(model.parameters()).device
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.end_ids = _end_token_ids(model, tokenizer)
        self.end_texts = frozenset(tokenizer.convert_ids_to_tokens(sorted(self.end_ids)))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.end_ids)
        self.sliding_window: int | None = getattr(model.config, "sliding_window", None)
        """Where some layers attend only to the last tokens (Gemma 3): caches past it cannot be cut."""

    @classmethod
    def load(cls, source: str | Path, *, dtype: str = "float32", device: str = "cpu",
             reuse_prefix: bool = True, draft: bool = True, pack: bool = True) -> LocalModel:
        """Load a registry name, a ``.gguf`` file, a local directory or a Hugging Face id.

        GGUF files (registry models included) are converted to safetensors once and cached.
        A name that is none of these fails at once with the closest registry names, also when
        the Hub is unreachable (no waiting for the Hub client's retries).

        With ``pack`` (the default), float32 linear layers on the CPU are packed for oneDNN
        (:mod:`towline.models.packed`): a pass over a few tokens then costs about what a pass
        over one does, which is what makes drafts pay on a CPU.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = str(source)
        options: dict = {}
        origin = "converted"
        if source in registry.REGISTRY:
            path = registry.local_weights(source)
        elif source.endswith(".gguf"):
            if not Path(source).is_file():
                raise ModelError(f"GGUF file {source} does not exist")
            path = registry.ensure_converted(Path(source))
        elif Path(source).expanduser().exists():
            origin, path = "directory", Path(source).expanduser()
        else:
            origin, path = "hub", source
            options = registry.hub_options(source)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **options)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **options)
        except Exception as error:
            if origin == "converted":  # a cache that passed the cheap check yet does not load (bit rot)
                fix = (f"run `towline models pull {source}` to repair it" if source in registry.REGISTRY
                       else f"delete {path} to convert the file again")
                raise ModelError(f"the converted cache {path} of {source!r} does not load ({error}): {fix}") from error
            if not isinstance(error, OSError):
                raise
            if origin == "hub":
                first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise registry.unknown_model_error(
                    source, f"the Hugging Face Hub could not provide it ({first_line})") from error
            raise ModelError(f"could not load model {source!r}: {error}\n{registry.MODEL_FORMS}") from error
        model = model.to(device)
        if pack:
            pack_linear_layers(model)
        return cls(model, tokenizer, name=source, reuse_prefix=reuse_prefix, draft=draft)

    @functools.cached_property
    def vocabulary(self) -> str:
        """A fingerprint of the tokenizer's vocabulary (every token string with its id): equal
        for models whose token ids mean the same, such as one family's sizes."""
        vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda item: item[1])
        digest = hashlib.sha256("\n".join(f"{i}\t{token}" for token, i in vocab).encode()).hexdigest()
        return f"{len(vocab)} tokens, sha256 {digest[:16]}"

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

    @property
    def _memory(self) -> _Memory:
        """One per model, and one per answer for answers run together (each extends a prompt
        of its own; each runs in its own thread)."""
        if not in_together():
            return self._shared_memory
        if not hasattr(self._answer_memory, "memory"):
            self._answer_memory.memory = _Memory()
        return self._answer_memory.memory

    def _reusable_prefix(self, ids: list[int], keep: int = 1) -> tuple[int, object] | None:
        """Where the cached prefix of the latest single row can start ``ids`` (at least the
        last ``keep`` of them fed again: their logits are wanted), and a copy of its cache."""
        prefix: _CachedPrefix | None = self._memory.prefix
        if not self.reuse_prefix or prefix is None:
            return None
        shared = common_prefix_length(prefix.ids, ids)
        shared = min(shared, len(ids) - keep)  # tokens whose logits are wanted must be fed
        if shared < MIN_REUSED_PREFIX:
            return None
        window = self.sliding_window
        if window and len(prefix.ids) >= window:
            return None  # sliding-window layers have dropped states that a crop would need
        cache = copy.deepcopy(prefix.cache)
        cache.crop(shared - len(prefix.ids))  # a negative crop removes that many tokens
        return shared, cache

    # -- decoding -----------------------------------------------------------------------

    def _piece(self, context: Sequence[int], token_id: int) -> str:
        """The text a token adds after ``context``. Decoding a token alone can drop its
        leading space (SentencePiece) or split a multi-byte character: a token that ends
        inside a character (half an emoji) adds nothing, and the token that completes the
        character adds all of it, so the pieces of a stream join into the decoded text."""
        context = list(context[-4:])  # a character spans at most 4 byte tokens
        before = self._decode(context).rstrip(UNFINISHED_CHARACTER)
        after = self._decode(context + [token_id]).rstrip(UNFINISHED_CHARACTER)
        return after[len(before):] if after.startswith(before) else self._decode([token_id])

    def _choose(self, logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
                top_logprobs: int, contexts: Sequence[Sequence[int]]) -> tuple[list[int], list[Step]]:
        """Pick one token per row and describe the distribution it came from."""
        chosen, logprobs = choose_with_logprobs(logits, sampling, generator)
        best = logprobs.topk(max(top_logprobs, 1), dim=-1)
        steps = []
        for row, (token_id, context) in enumerate(zip(chosen.tolist(), contexts)):
            top = tuple(Token(self._piece(context, i), lp, i)
                        for i, lp in zip(best.indices[row].tolist(), best.values[row].tolist()))
            steps.append(Step(Token(self._piece(context, token_id), logprobs[row, token_id].item(), token_id), top))
        return chosen.tolist(), steps

    def _decode_rows(self, prompts: Sequence[str], *, max_tokens: int, sampling: Sampling,
                     top_logprobs: int, stop: Sequence[str], finish: list[str | None],
                     lookup: Sequence[str] = ()) -> Iterator[list[Step | None]]:
        """The decoding loop: yields, after each position, the new step of every row (None
        for rows already finished), and fills ``finish`` with each row's finish reason."""
        prompt_ids = [self.encode(p) for p in prompts]
        drafts = len(prompts) == 1 and sampling.greedy and max_tokens > 0
        if drafts and self._may_draft(len(prompt_ids[0]) + max_tokens):
            yield from self._decode_drafted(prompt_ids[0], max_tokens=max_tokens, top_logprobs=top_logprobs,
                                            stop=stop, finish=finish, lookup=lookup)
            return
        generator = sampling_generator(sampling)
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

    def _may_draft(self, tokens: int) -> bool:
        """Whether drafts may be checked for a row that grows to ``tokens``: rolling back a
        wrong draft needs a cache that keeps every token (no sliding window within reach)."""
        return self.draft and self._within_window(tokens + DRAFT_SIZES[-1] + 2)

    def _within_window(self, columns: int) -> bool:
        """Whether every query over ``columns`` cache columns still sees all of them (no
        sliding window, or a longer one): only then are holes and rollbacks exact."""
        return not self.sliding_window or columns < self.sliding_window - 1

    def _forward_one(self, feed: Feed) -> tuple[torch.Tensor, object]:
        """One forward pass: the logits of the last ``feed.keep`` columns, and the cache."""
        with torch.inference_mode():
            out = self.model(
                input_ids=feed.ids.to(self.device),
                attention_mask=feed.mask.to(self.device),
                position_ids=feed.positions.to(self.device),
                past_key_values=own_cache(feed.cache),
                use_cache=True,
                logits_to_keep=feed.keep,
            )
        return out.logits[:, -feed.keep:, :].float().cpu(), out.past_key_values

    def _decode_drafted(self, prompt_ids: list[int], *, max_tokens: int, top_logprobs: int,
                        stop: Sequence[str], finish: list[str | None],
                        lookup: Sequence[str]) -> Iterator[list[Step | None]]:
        """Greedy decoding of one row that checks drafts: the pass that reads the prompt, and
        each that feeds a chosen token, also feeds a draft of the tokens after it
        (:func:`lookup_draft` over ``lookup`` and the text so far). Each drafted token that is
        the greedy choice at its position is taken with the logits that pass already
        computed; the first that is not, and all after it, are rolled back. Yields what
        :meth:`_decode_rows` yields for one row."""
        sources = [self.tokenizer(text, add_special_tokens=False).input_ids for text in lookup if text]
        # The prompt's own pass checks the first draft.
        draft_size = self._memory.draft_size
        # Answers run together share each pass, where every row's draft costs its columns: the
        # few tokens' worth a pass costs little more for are shared out.
        most = max(DRAFT_SIZES[2] // answers_together(), DRAFT_SIZES[0])
        drafted = lookup_draft(prompt_ids, sources, size=min(draft_size, most, max_tokens - 1))
        batch = _Batch(self, [prompt_ids + drafted], keep=len(drafted) + 1)
        ahead = list(batch.recent[0])  # logits after the last chosen token, then after each of ``drafted``
        generated: list[int] = []
        finish[:] = ["length"]
        try:
            while True:
                context = prompt_ids + generated
                [token_id], [step] = self._choose(ahead.pop(0)[None], GREEDY, None, top_logprobs, [context])
                if token_id in self.end_ids:
                    finish[0] = "end"
                    return
                generated.append(token_id)
                yield [step]
                if stop and any(s in self._decode(generated) for s in stop):
                    finish[0] = "stop"
                    return
                if len(generated) == max_tokens:
                    return
                if drafted:
                    if drafted.pop(0) == token_id:  # already fed: ``ahead`` has what follows it
                        if not drafted:
                            draft_size = min(draft_size + 2, DRAFT_SIZES[2])
                        continue
                    batch.truncate([len(drafted) + 1])
                    drafted = []
                    draft_size = max(draft_size - 1, DRAFT_SIZES[0])
                drafted = lookup_draft(prompt_ids + generated, sources,
                                       size=min(draft_size, most, max_tokens - len(generated) - 1))
                ahead = list(batch.feed([[token_id] + drafted])[0])
        finally:
            batch.remember()  # drafted tokens left in the cache are real tokens of it
            self._memory.draft_size = draft_size

    def complete(self, prompts: Sequence[str], *, max_tokens: int, sampling: Sampling = GREEDY,
                 top_logprobs: int = 1, stop: Sequence[str] = (), lookup: Sequence[str] = ()) -> list[Completion]:
        if not prompts:
            return []
        steps: list[list[Step]] = [[] for _ in prompts]
        finish: list[str | None] = ["length"] * len(prompts)
        if max_tokens > 0:
            for new in self._decode_rows(prompts, max_tokens=max_tokens, sampling=sampling,
                                         top_logprobs=top_logprobs, stop=stop, finish=finish, lookup=lookup):
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
               top_logprobs: int = 1, lookup: Sequence[str] = ()) -> Generator[Step, None, None]:
        rows = self._decode_rows([prompt], max_tokens=max_tokens, sampling=sampling,
                                 top_logprobs=top_logprobs, stop=(), finish=[None], lookup=lookup)
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
            start = max(common_prefix_length(prompt_ids, full_ids), 1)
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
    """A :class:`_Batch` behind the :class:`DecodeState` interface.

    Appended tokens wait in ``_pending`` until a distribution is asked for, and are then fed
    together: appending a token nobody asks about (the last one of an answer) costs nothing.
    """

    def __init__(self, model: LocalModel, prompts: Sequence[str]) -> None:
        if not prompts:
            raise ValueError("open() needs at least one prompt")
        self._model = model
        self._batch: _Batch | None = _Batch(model, [model.encode(p) for p in prompts])
        self._pending: list[list[int]] = [[] for _ in prompts]
        self._pieces: list[list[str]] = [[] for _ in prompts]

    def _open_batch(self) -> _Batch:
        if self._batch is None:
            raise ValueError("this DecodeState is closed")
        return self._batch

    def _flush(self) -> _Batch:
        batch = self._open_batch()
        if any(self._pending):
            batch.feed(self._pending)
            self._pending = [[] for _ in self._pending]
        return batch

    def _distribution(self, logits: torch.Tensor, context: Sequence[int], top_logprobs: int) -> Distribution:
        logprobs = torch.log_softmax(logits, dim=-1)
        best = logprobs.topk(max(top_logprobs, 1))
        top = tuple(Token(self._model._piece(context, i), lp, i)
                    for i, lp in zip(best.indices.tolist(), best.values.tolist()))
        return Distribution(top=top, full=logprobs.numpy())

    def _ids(self, rows: Sequence[Sequence[Token | int]]) -> tuple[list[list[int]], list[list[str]]]:
        """Token ids per row and the text each adds."""
        batch = self._open_batch()
        if len(rows) != len(self._pieces):
            raise ValueError(f"tokens for {len(rows)} rows, but the state has {len(self._pieces)}")
        ids: list[list[int]] = []
        texts: list[list[str]] = []
        for row, tokens in enumerate(rows):
            context = batch.fed[row] + self._pending[row]
            row_ids, row_texts = [], []
            for token in tokens:
                token_id = token if isinstance(token, int) else token.id
                if token_id is None:
                    raise ValueError("local decoding needs token ids: append Tokens taken from this "
                                     "model, or ids")
                row_texts.append(self._model._piece(context + row_ids, token_id)
                                 if isinstance(token, int) else token.text)
                row_ids.append(token_id)
            ids.append(row_ids)
            texts.append(row_texts)
        return ids, texts

    def next(self, *, top_logprobs: int = 20) -> list[Distribution]:
        batch = self._flush()
        return [self._distribution(logits, fed, top_logprobs)
                for logits, fed in zip(batch.last_logits, batch.fed)]

    def append(self, tokens: Sequence[Token | int]) -> None:
        ids, texts = self._ids([[t] for t in tokens])
        for row in range(len(ids)):
            self._pending[row].extend(ids[row])
            self._pieces[row].extend(texts[row])

    def extend(self, tokens: Sequence[Sequence[Token | int]], *,
               top_logprobs: int = 20) -> list[list[Distribution]]:
        new, texts = self._ids(tokens)
        batch = self._open_batch()
        waiting = [len(p) for p in self._pending]
        logits = batch.feed([p + ids for p, ids in zip(self._pending, new)])
        self._pending = [[] for _ in self._pending]
        out = []
        for row, (row_logits, skip, ids) in enumerate(zip(logits, waiting, new)):
            self._pieces[row].extend(texts[row])
            start = len(batch.fed[row]) - len(ids)
            out.append([self._distribution(row_logits[skip + k], batch.fed[row][: start + k + 1], top_logprobs)
                        for k in range(len(ids))])
        return out

    def truncate(self, counts: int | Sequence[int]) -> None:
        batch = self._open_batch()
        counts = row_counts(counts, len(self._pieces))
        for row, count in enumerate(counts):
            if count > len(self._pieces[row]):
                raise ValueError(f"row {row} has {len(self._pieces[row])} appended tokens; cannot "
                                 f"roll back {count} (the prompt stays)")
        # Pending tokens go first; the rest comes off the cache (which may refuse, so first).
        fed_counts = [max(count - len(pending), 0) for count, pending in zip(counts, self._pending)]
        if any(fed_counts):
            batch.truncate(fed_counts)
        for row, count in enumerate(counts):
            waiting = count - fed_counts[row]
            del self._pending[row][len(self._pending[row]) - waiting:]
            del self._pieces[row][len(self._pieces[row]) - count:]

    def reorder(self, rows: Sequence[int]) -> None:
        self._open_batch().reorder(rows)
        self._pending = [list(self._pending[i]) for i in rows]
        self._pieces = [list(self._pieces[i]) for i in rows]

    @property
    def texts(self) -> list[str]:
        return ["".join(pieces) for pieces in self._pieces]

    def close(self) -> None:
        if self._batch is not None:
            self._batch.close()
            self._batch = None


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
