"""Tests for towline.methods.nudging (docs/nudging.md).

Two kinds of models drive the algorithm here:

- tiny random-init Llamas (conftest) for the properties docs/nudging.md states for any models
  (γ = 0, γ > 1, a guide that ends at once, different tokenizers, the length budget);
- :class:`ScriptedBase` / :class:`ScriptedGuide`, tiny deterministic models written for the
  rules that random weights almost never exercise (agreement, confidence, repetition). They
  are honest models: the base's next token is a fixed function of the text it continues, so
  every question nudging asks it is answered as a real model would answer it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from towline.methods.base import Participant
from towline.methods.nudging import (Nudging, NudgingResult, nudge, split_words,
                                      strip_repeated_suffix)
from towline.models.base import GREEDY, Completion, Model, ModelError, Sampling, Step, Token
from towline.models.local import LocalModel
from towline.prompts import PromptRequest, build_prompt

QUESTION = "What is 2+2?"
BASE_PROMPT = QUESTION + "\n"  # the plain prompt docs/prompts.md gives a base for this request
EOS = None


# -- scripted models ----------------------------------------------------------------------


def word_tokens(text: str) -> list[str]:
    """The scripted models' tokenizer: a word with the whitespace before it, or trailing whitespace."""
    return re.findall(r"\s*\S+|\s+$", text)


class Scripted(Model):
    """What both scripted models share: word tokens; nudging never scores or opens states."""

    def score(self, prompts, continuations, *, top_logprobs=1):
        raise NotImplementedError

    def open(self, prompts):
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        return len(word_tokens(text))


class ScriptedBase(Scripted):
    """A deterministic LM over word tokens: ``rule(text)`` gives the greedy next token after
    ``text`` and its probability (``(EOS, p)`` for end of text). ``asked`` records the text of
    every decoding it was asked to do."""

    def __init__(self, rule: Callable[[str], tuple[str | None, float]], name: str = "scripted-base") -> None:
        self.rule = rule
        self.name = name
        self.asked: list[str] = []
        self.steps_decoded = 0

    def _decode(self, prompt: str, max_tokens: int):
        self.asked.append(prompt)
        text = prompt
        for _ in range(max_tokens):
            token, prob = self.rule(text)
            if token is EOS:
                return
            self.steps_decoded += 1
            taken = Token(token, math.log(prob))
            yield Step(taken, (taken,))
            text += token

    def complete(self, prompts, *, max_tokens, sampling=GREEDY, top_logprobs=1, stop=(), lookup=()):
        out = []
        for prompt in prompts:
            steps = list(self._decode(prompt, max_tokens))
            ended = len(steps) < max_tokens
            out.append(Completion("".join(s.token.text for s in steps), steps, "end" if ended else "length"))
        return out

    def stream(self, prompt, *, max_tokens, sampling=GREEDY, top_logprobs=1, lookup=()):
        yield from self._decode(prompt, max_tokens)


def rules(table: dict[str, tuple[str | None, float]], default: tuple[str | None, float]):
    """A base rule from a table keyed by the text's ending (the longest matching key wins)."""
    keys = sorted(table, key=len, reverse=True)

    def rule(text: str) -> tuple[str | None, float]:
        for key in keys:
            if text.endswith(key):
                return table[key]
        return default

    return rule


def sentence(words: Sequence[str], *, prob: float = 0.9, then_end: bool = True):
    """A base that, after any text, writes ``words`` in order (each with a leading space) and
    then ends (or starts over); after a word that is not one of them it starts the sentence."""

    def rule(text: str) -> tuple[str | None, float]:
        last = text.split()[-1] if text.split() else ""
        if last in words:
            i = words.index(last) + 1
            if i == len(words):
                return (EOS, prob) if then_end else (" " + words[0], prob)
            return " " + words[i], prob
        return " " + words[0], prob

    return rule


def guide_steps(tokens: Sequence[str]) -> list[Step]:
    """The scripted guides' steps: each token sure at probability 0.9."""
    return [Step(Token(t, math.log(0.9)), (Token(t, math.log(0.9)),)) for t in tokens]


class ScriptedGuide(Scripted):
    """A guide that proposes the given texts, one per call, then ends its answer with
    ``final`` (its last text before its end of text)."""

    chat_template = None

    def __init__(self, proposals: Sequence[str], name: str = "scripted-guide", final: str = "") -> None:
        self.proposals = list(proposals)
        self.name = name
        self.final = final
        self.seen: list[str] = []

    def complete(self, prompts, *, max_tokens, sampling=GREEDY, top_logprobs=1, stop=(), lookup=()):
        (prompt,) = prompts
        self.seen.append(prompt)
        ended = len(self.seen) > len(self.proposals)
        tokens = word_tokens(self.final if ended else self.proposals[len(self.seen) - 1])
        assert len(tokens) <= max_tokens, "scripted proposal longer than guide_chunk"
        steps = guide_steps(tokens)
        return [Completion("".join(tokens), steps, "end" if ended else "length")]

    def stream(self, prompt, *, max_tokens, sampling=GREEDY, top_logprobs=1, lookup=()):
        yield from self.complete([prompt], max_tokens=max_tokens)[0].steps


def run(base: Model, guide: Model, **kwargs) -> NudgingResult:
    kwargs.setdefault("guide_template", "chatml")
    return nudge(base=base, guide=guide, request=QUESTION, **kwargs)


def pairs(result: NudgingResult) -> list[tuple[str, str]]:
    return [(r.nudging_words, r.base_text) for r in result.rounds]


def joined(result: NudgingResult) -> str:
    return "".join(r.nudging_words + r.base_text for r in result.rounds)


# -- split_words / strip_repeated_suffix --------------------------------------------------


@pytest.mark.parametrize(
    "proposal, words",
    [
        ("The answer is 4", ["The", "answer", "is", "4"]),
        ("  The answer", ["  The", "answer"]),  # leading spaces stay with the first word
        (" The", [" The"]),
        ("a  b", ["a", "", "b"]),  # a double space gives an empty word
        ("a   b", ["a", "", "", "b"]),
        ("Step 1:\nAdd 2 and\n\n2", ["Step", "1:\nAdd", "2", "and\n\n2"]),  # newlines stay inside
        ("ends with space ", ["ends", "with", "space", ""]),
        ("", [""]),
        ("   ", ["   "]),
        ("\n  x", ["\n", "", "x"]),  # only spaces count as leading spaces
    ],
)
def test_split_words_examples(proposal, words):
    assert split_words(proposal) == words


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(" a\nb\tç")), max_size=30) | st.text(max_size=30))
def test_split_words_round_trips(text):
    words = split_words(text)
    assert " ".join(words) == text
    assert all(" " not in w for w in words[1:])
    assert words[0].lstrip(" ").count(" ") == 0


SENTENCE = "It repeats itself again and again. "  # 35 characters


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Intro. " + SENTENCE * 2, "Intro. " + SENTENCE),
        ("Intro. " + SENTENCE * 5, "Intro. " + SENTENCE),  # stripped repeatedly
        (SENTENCE * 2, SENTENCE),
        ("x" * 60, "x" * 30),
        ("x" * 58, "x" * 58),  # a repeat of 29 characters is too short
        ("Intro. " + "Short repeated bit. " * 2, "Intro. " + "Short repeated bit. " * 2),  # < 30 chars
        ("A" * 10 + SENTENCE + "tail", "A" * 10 + SENTENCE + "tail"),
        ("", ""),
    ],
)
def test_strip_repeated_suffix_examples(text, expected):
    assert strip_repeated_suffix(text) == expected


def test_strip_repeated_suffix_threshold():
    part = "0123456789" * 3  # exactly 30 characters, no repeat of its own
    assert strip_repeated_suffix("start:" + part + part) == "start:" + part
    short = part[:-1]  # 29 characters
    assert strip_repeated_suffix("start:" + short + short) == "start:" + short + short
    # The repeat must be immediate: something between the two copies keeps both.
    assert strip_repeated_suffix("start:" + part + "!" + part) == "start:" + part + "!" + part
    assert strip_repeated_suffix(part * 2, min_chars=31) == part * 2


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["ab", "abc", " ", "x" * 15, SENTENCE, "The end."]), max_size=12))
def test_strip_repeated_suffix_properties(parts):
    text = "".join(parts)
    stripped = strip_repeated_suffix(text)
    assert text.startswith(stripped)
    assert strip_repeated_suffix(stripped) == stripped  # nothing left to strip
    for length in range(30, len(stripped) // 2 + 1):
        assert stripped[-length:] != stripped[-2 * length: -length]


# -- Properties of the rules on tiny models --------------------------------------------------------


def prompts_for(base: Model, guide: Model, **templates) -> tuple[str, str]:
    request = PromptRequest(question=QUESTION)
    b = build_prompt(request, chat=False, template=templates.get("base_template"))
    g = build_prompt(request, chat=True, template=templates.get("guide_template"),
                     model_template=guide.chat_template)
    return b.text, g.text


def test_gamma_zero_guide_gives_first_word_base_writes_greedily(tiny_base, tiny_guide, eos_biased):
    # γ = 0: the base is always ready and always confident, so each round is the guide's
    # first word followed by the base's own greedy text up to its end of text. A large
    # base_chunk keeps the base phase one chunk (no re-tokenisation, no chunk guards) and an
    # EOS bias makes the base end its text now and then, so there are several rounds.
    base = eos_biased(tiny_base, 32.0)
    max_tokens = 40
    result = nudge(base=base, guide=tiny_guide, request=QUESTION, gamma=0.0, guide_chunk=8,
                   base_chunk=64, max_tokens=max_tokens)
    assert result.stop_reason == "length"
    assert len(result.rounds) >= 4
    assert any(r.base_text for r in result.rounds)
    base_prompt, guide_prompt = result.prompts["base"], result.prompts["guide"]
    assert (base_prompt, guide_prompt) == prompts_for(base, tiny_guide)
    out = ""
    for number, r in enumerate(result.rounds):
        (proposal,) = tiny_guide.complete([guide_prompt + out], max_tokens=8)
        words = split_words(proposal.text)
        assert "" not in words[1:2]  # no empty second word: w_0 alone is expected
        if number == len(result.rounds) - 1:  # the budget may cut the last round's words
            assert words[0].startswith(r.nudging_words) and r.nudging_words
        else:
            assert r.nudging_words == words[0]
        out += r.nudging_words
        (greedy,) = base.complete([base_prompt + out], max_tokens=max_tokens)
        pieces = [s.token.text for s in greedy.steps]
        if number < len(result.rounds) - 1:
            assert greedy.finish_reason == "end"  # the round ended with the base's text
            assert r.base_text == "".join(pieces)
        else:  # the last round ran out of budget
            assert r.base_text in {"".join(pieces[:m]) for m in range(len(pieces) + 1)}
        out += r.base_text
    assert result.text == strip_repeated_suffix(out)


def test_gamma_zero_one_round_is_the_base_greedy_continuation(tiny_base, tiny_guide):
    result = nudge(base=tiny_base, guide=tiny_guide, request=QUESTION, gamma=0.0, guide_chunk=8,
                   base_chunk=64, max_tokens=30)
    assert result.stop_reason == "length" and len(result.rounds) == 1
    (r,) = result.rounds
    (greedy,) = tiny_base.complete([result.prompts["base"] + r.nudging_words], max_tokens=30)
    n = 30 - tiny_base.count_tokens(r.nudging_words)
    assert result.base_tokens == n
    assert r.base_text == "".join(s.token.text for s in greedy.steps[:n])


def test_gamma_one_base_adds_at_most_one_token_per_round(tiny_base):
    # Guide and base: the same model on the same prompt, so the base often agrees with the
    # guide's next word and gets a base phase; with γ > 1 it can never be confident, so every
    # base phase is exactly its first token.
    result = nudge(base=tiny_base, guide=tiny_base, request=QUESTION, gamma=1.0,
                   base_template="chatml", guide_template="chatml", max_tokens=30)
    assert result.prompts["base"] == result.prompts["guide"]
    with_base = [r for r in result.rounds if r.base_text]
    assert len(with_base) >= 2
    assert result.base_tokens == len(with_base)
    out = ""
    for r in result.rounds:
        out += r.nudging_words
        if r.base_text:
            (greedy,) = tiny_base.complete([result.prompts["base"] + out], max_tokens=1)
            assert r.base_text == greedy.steps[0].token.text
        out += r.base_text


def test_guide_that_stops_at_once_ends_the_answer(tiny_base, tiny_guide, eos_biased):
    guide = eos_biased(tiny_guide, 1e4)
    result = nudge(base=tiny_base, guide=guide, request=QUESTION)
    assert result.stop_reason == "guide_stop"
    assert len(result.rounds) == 1
    assert result.text == "" and pairs(result) == [("", "")]
    assert result.model_calls == {"base": 0, "guide": 1}
    assert result.tokens == 0 and result.guide_token_fraction == 0.0


def test_guide_that_stops_later_keeps_its_last_text(tiny_base, tiny_guide, eos_biased):
    # The guide's greedy answer ends after a few tokens: its final text is appended whole.
    guide_prompt = prompts_for(tiny_base, tiny_guide)[1]
    (plain,) = tiny_guide.complete([guide_prompt], max_tokens=16)
    ids = tiny_guide.tokenizer(guide_prompt).input_ids + [s.token.id for s in plain.steps]
    eos = tiny_guide.tokenizer.eos_token_id
    with torch.inference_mode():
        logits = tiny_guide.model(input_ids=torch.tensor([ids])).logits[0, -17:-1]
    gaps = [(torch.cat([r[:eos], r[eos + 1:]]).max() - r[eos]).item() for r in logits]
    k = min(range(2, 16), key=lambda j: gaps[j] - min(gaps[:j]))
    assert gaps[k] < min(gaps[:k])
    guide = eos_biased(tiny_guide, (gaps[k] + min(gaps[:k])) / 2)
    result = nudge(base=tiny_base, guide=guide, request=QUESTION, guide_chunk=16, gamma=1.0)
    assert result.stop_reason == "guide_stop" and len(result.rounds) == 1
    assert result.text == tiny_guide.tokenizer.decode([s.token.id for s in plain.steps[:k]])
    assert result.guide_token_fraction == 1.0 or result.tokens == 0


def test_length_budget_on_tiny_models(tiny_base, tiny_guide):
    max_tokens = 24
    result = nudge(base=tiny_base, guide=tiny_guide, request=QUESTION, max_tokens=max_tokens)
    assert result.stop_reason == "length"
    assert result.guide_tokens == sum(tiny_base.count_tokens(w) for w in result.nudging_words)
    assert result.tokens == max_tokens
    assert result.text == strip_repeated_suffix(joined(result))
    assert 0 <= result.guide_token_fraction <= 1


@settings(max_examples=15, deadline=None)
@given(max_tokens=st.integers(1, 48), guide_chunk=st.sampled_from([1, 2, 5, 16, 128]),
       base_chunk=st.sampled_from([1, 3, 16]), gamma=st.sampled_from([0.0, 0.4, 1.0]))
def test_length_budget_is_never_exceeded(tiny_base, tiny_guide, max_tokens, guide_chunk, base_chunk, gamma):
    # Large guide chunks and γ = 1 (the base never confident) make long nudging words, the
    # case that used to pass the budget: --max-tokens 4 --guide-chunk 128 gave 56 tokens.
    result = nudge(base=tiny_base, guide=tiny_guide, request=QUESTION, max_tokens=max_tokens,
                   guide_chunk=guide_chunk, base_chunk=base_chunk, gamma=gamma)
    assert result.tokens <= max_tokens
    assert result.guide_tokens == sum(tiny_base.count_tokens(w) for w in result.nudging_words)
    assert result.stop_reason in {"length", "guide_stop", "repeated_nudging", "rounds"}
    assert result.text == strip_repeated_suffix(joined(result))


def test_different_tokenizers(tiny_base, tiny_bpe, bpe_tokenizer, smollm2_tokenizer):
    other = tiny_bpe
    assert len(bpe_tokenizer) != len(smollm2_tokenizer)
    text = "What is 2+2? The answer is 4."
    assert bpe_tokenizer(text).input_ids != smollm2_tokenizer(text).input_ids
    assert bpe_tokenizer.decode(bpe_tokenizer(text).input_ids) == text
    assert other.chat_template
    for base, guide in [(tiny_base, other), (other, tiny_base)]:
        for gamma in (0.4, 0.0, 1.0):
            result = nudge(base=base, guide=guide, request=QUESTION, gamma=gamma, max_tokens=30,
                           guide_chunk=6, base_chunk=6)
            assert result.stop_reason in {"length", "guide_stop", "repeated_nudging", "rounds"}
            assert result.rounds
            assert result.text == strip_repeated_suffix(joined(result))
            assert joined(result).startswith(result.text)
            assert 0 <= result.guide_token_fraction <= 1
            assert result.guide_tokens == sum(base.count_tokens(w) for w in result.nudging_words)
            assert result.prompts["guide"].startswith("<|im_start|>")
            assert result.prompts["base"] == QUESTION + "\n"
            # A repeated-nudging stop asked the guide once more, for words it did not append.
            assert result.model_calls["guide"] == len(result.rounds) + (result.stop_reason == "repeated_nudging")


def test_result_fields(tiny_base, tiny_guide):
    result = nudge(base=tiny_base, guide=tiny_guide, request=QUESTION, max_tokens=16)
    data = result.to_dict()
    for key in ["text", "stop_reason", "nudging_words", "rounds", "guide_token_fraction", "tokens",
                "model_calls", "seconds", "prompts"]:
        assert key in data
    assert set(data["model_calls"]) == {"base", "guide"}
    assert set(data["prompts"]) == {"base", "guide"}
    assert data["nudging_words"] == [r["nudging_words"] for r in data["rounds"]]
    assert data["rounds"] == [{"nudging_words": r.nudging_words, "base_text": r.base_text} for r in result.rounds]
    assert data["tokens"] == result.guide_tokens + result.base_tokens
    assert data["seconds"] > 0
    json.dumps(data)  # plain data
    assert result.nudging_words == [r.nudging_words for r in result.rounds]


def test_on_text_sees_every_round_as_it_ends(tiny_base, tiny_guide):
    seen: list[tuple[str, str]] = []
    result = nudge(base=tiny_base, guide=tiny_guide, request=QUESTION, max_tokens=16,
                   on_text=lambda piece, role: seen.append((piece, role)))
    assert seen == [pair for r in result.rounds for pair in ((r.nudging_words, "guide"), (r.base_text, "base"))]


def test_sampling_is_repeatable(tiny_base, tiny_guide):
    def go(seed):
        return nudge(base=tiny_base, guide=tiny_guide, request=QUESTION, max_tokens=20,
                     base_sampling=Sampling(temperature=1.0, seed=seed),
                     guide_sampling=Sampling(temperature=1.0, seed=seed)).text

    assert go(5) == go(5)
    assert go(5) != go(6)


@pytest.mark.parametrize("sampling", [GREEDY, Sampling(temperature=1.0, seed=3)])
def test_answers_run_together_are_the_answers_alone(tiny_base, tiny_guide, sampling):
    """run_batch (what evaluation calls) merges the answers' model calls; each answer is the
    one run alone, also sampled (each call draws from its own seeded stream)."""
    method = Nudging(gamma=0.4, max_tokens=24)
    models = {"base": Participant(tiny_base, sampling), "guide": Participant(tiny_guide, sampling)}
    requests = [PromptRequest(question=q) for q in ("What is 2+2?", "Name a colour.", "Count to five, slowly.")]
    together = method.run_batch(requests, models)
    for request, result in zip(requests, together, strict=True):
        alone = method.run(request, models)
        assert [(r.nudging_words, r.base_text) for r in result.rounds] == [
            (r.nudging_words, r.base_text) for r in alone.rounds]
        assert (result.text, result.stop_reason, result.model_calls) == (alone.text, alone.stop_reason,
                                                                          alone.model_calls)
    assert len({r.seconds for r in together}) == 1  # each answer's share of the whole


def test_models_that_do_not_merge_calls_answer_one_at_a_time():
    """Scripted models do not merge calls: run_batch answers one request after the other."""
    base, guide = ScriptedBase(sentence(["It", "is", "four."])), ScriptedGuide(["So,", "Well,"], final="Done.")
    assert not base.merges_calls
    requests = [PromptRequest(question=q) for q in ("What is 2+2?", "What is 3+1?")]
    Nudging(max_tokens=12).run_batch(requests, {"base": Participant(base), "guide": Participant(guide, template="chatml")})
    first = ["2+2" in prompt for prompt in guide.seen]
    assert first[0] and not first[-1] and first == sorted(first, reverse=True)


def test_bad_arguments(tiny_base, tiny_guide):
    for bad in ({"guide_chunk": 0}, {"base_chunk": 0}, {"max_tokens": 0}, {"max_rounds": 0}):
        with pytest.raises(ValueError):
            nudge(base=tiny_base, guide=tiny_guide, request=QUESTION, **bad)


# -- step 2: accepting guide words (scripted base) ----------------------------------------

LOW, HIGH = 0.1, 0.9


def test_agreement_makes_the_base_ready():
    # After "Hello" the base is unsure (0.1) but its token " b" starts " big": it agrees.
    base = ScriptedBase(rules({"Hello": (" b", LOW)}, default=(" zz", LOW)))
    result = run(base, ScriptedGuide(["Hello big world today"]))
    assert pairs(result)[0] == ("Hello", " b")  # its first token taken unconditionally
    assert base.asked == [BASE_PROMPT + "Hello"]  # one question; the base phase went on from it
    assert result.stop_reason == "guide_stop" and result.text == "Hello b"
    assert result.model_calls == {"base": 1, "guide": 2}


def test_agreement_needs_the_token_to_be_a_prefix_of_the_word():
    base = ScriptedBase(rules({"Hello": (" bigger", LOW)}, default=(" zz", LOW)))
    result = run(base, ScriptedGuide(["Hello big world"]))
    assert pairs(result)[0] == ("Hello big", "")  # not ready at "big" or "world"


def test_confidence_makes_the_base_ready():
    base = ScriptedBase(rules({"Hello": (" x", LOW), "Hello big": (" q", 0.5), "q": (" r", 0.45),
                               "r": (" s", 0.2)}, default=(" zz", LOW)))
    result = run(base, ScriptedGuide(["Hello big world today"]), gamma=0.4)
    # Not ready after "Hello" (no agreement, 0.1 < γ): "big" accepted; ready after "Hello big"
    # (0.5 ≥ γ); the base goes on while confident and stops before " s" (0.2 < γ).
    assert pairs(result)[0] == ("Hello big", " q r")
    assert base.asked == [BASE_PROMPT + "Hello", BASE_PROMPT + "Hello big"]


def test_not_ready_at_the_last_word_never_accepts_it():
    base = ScriptedBase(rules({}, default=(" x", LOW)))
    guide = ScriptedGuide(["Hello big world toda", " next"])
    result = run(base, guide)
    assert pairs(result)[:2] == [("Hello big world", ""), (" next", "")]
    assert base.asked == [BASE_PROMPT + "Hello", BASE_PROMPT + "Hello big", BASE_PROMPT + "Hello big world"]
    # No base phase: the next round's guide sees the nudging words only.
    assert guide.seen[1].endswith("Hello big world")
    assert result.text == "Hello big world next"


def test_one_word_proposal_is_accepted_whole_without_the_base():
    base = ScriptedBase(rules({}, default=(" x", HIGH)))
    result = run(base, ScriptedGuide(["  Hello", "World"]))
    assert pairs(result) == [("  Hello", ""), ("World", ""), ("", "")]
    assert base.asked == []
    assert result.model_calls["base"] == 0
    assert result.text == "  HelloWorld" and result.guide_token_fraction == 1.0


class CutGuide(ScriptedGuide):
    """A guide whose next text is ``rule(prompt)`` (None: it ends its answer), cut to the tokens
    asked for; records how many were asked for."""

    def __init__(self, rule: Callable[[str], str | None]) -> None:
        super().__init__([])
        self.rule = rule
        self.asked_for: list[int] = []

    def complete(self, prompts, *, max_tokens, sampling=GREEDY, top_logprobs=1, stop=(), lookup=()):
        (prompt,) = prompts
        self.asked_for.append(max_tokens)
        text = self.rule(prompt)
        if text is None:
            return [Completion("", [], "end")]
        tokens = word_tokens(text)[:max_tokens]
        steps = guide_steps(tokens)
        return [Completion("".join(tokens), steps, "length")]


@pytest.mark.parametrize("ready_at_B, adapted_asks", [(True, [16, 4, 4]), (False, [16, 4, 16, 16])])
def test_adapted_proposals_ask_for_what_the_base_needed_plus_slack(ready_at_B, adapted_asks):
    lower = " " + " ".join("abcdefghijklmnop")
    upper = lower.upper()
    # Round 1 (16 tokens asked): the base is ready at " b", the second word, so the 2 tokens it
    # needed and 2 more are asked for next. Round 2: the base is ready at " B" (4 asked, 4
    # next), or nowhere in those 4 tokens, so the whole 16 are asked for again (and next, as
    # the base needed all of them). Round 3: the guide ends its answer.
    guide = CutGuide(lambda prompt: None if prompt.endswith((" O", " B")) else upper if prompt.endswith(" b") else lower)
    table = {" a": (" b", HIGH), " A": (" B", HIGH)} if ready_at_B else {" a": (" b", HIGH)}
    texts = {}
    for adapt in (False, True):
        guide.asked_for = []
        result = run(ScriptedBase(rules(table, default=(" z", LOW))), guide, adapt_proposals=adapt)
        assert guide.asked_for == (adapted_asks if adapt else [16] * 3)
        assert result.stop_reason == "guide_stop"
        texts[adapt] = pairs(result)
    # The whole proposal's outcome, either way.
    assert texts[True] == texts[False]
    assert texts[True][1] == ((" A", " B") if ready_at_B else (upper.rsplit(" ", 1)[0], ""))


def test_empty_words_are_accepted_without_asking():
    base = ScriptedBase(rules({}, default=(" x", LOW)))
    result = run(base, ScriptedGuide(["Hello  world there"]))
    assert pairs(result)[0] == ("Hello  world", "")
    # The empty word after "Hello" was not asked about; "world" was asked after "Hello ".
    assert base.asked == [BASE_PROMPT + "Hello ", BASE_PROMPT + "Hello  world"]


def test_ready_after_an_empty_word_continues_from_it():
    # After "Hello " a token "wo" cannot agree with " world" (" " + w_i): only confidence
    # makes the base ready there.
    base = ScriptedBase(rules({"Hello ": ("w", HIGH), "w": (" go", HIGH), "go": (" on", LOW)},
                              default=(" x", LOW)))
    result = run(base, ScriptedGuide(["Hello  world there"]))
    assert pairs(result)[0] == ("Hello ", "w go")
    assert base.asked == [BASE_PROMPT + "Hello "]
    unsure = ScriptedBase(rules({"Hello ": ("wo", LOW)}, default=(" x", LOW)))
    assert pairs(run(unsure, ScriptedGuide(["Hello  world there"])))[0] == ("Hello  world", "")


def test_base_end_of_text_at_a_check_ends_the_round_without_base_phase():
    base = ScriptedBase(rules({"Hello": (EOS, HIGH)}, default=(" x", LOW)))
    guide = ScriptedGuide(["Hello big world", " more words"])
    result = run(base, guide)
    assert pairs(result) == [("Hello", ""), (" more", ""), ("", "")]
    assert base.asked == [BASE_PROMPT + "Hello", BASE_PROMPT + "Hello more"]
    assert result.stop_reason == "guide_stop"  # the base's end of text did not stop the answer


def test_base_end_of_text_in_base_phase_ends_only_the_round():
    base = ScriptedBase(rules({"Hello": (" a", HIGH), "a": (" b", HIGH), "b": (EOS, HIGH)},
                              default=(" x", LOW)))
    result = run(base, ScriptedGuide(["Hello big", " Then more"]))
    assert pairs(result)[:2] == [("Hello", " a b"), (" Then", "")]
    assert result.stop_reason == "guide_stop"
    assert result.text == "Hello a b Then"


def test_base_phase_stops_before_the_first_unsure_token_across_chunks():
    # Confident tokens over several chunks of 2; the first unsure one is left out.
    words = [" c1", " c2", " c3", " c4", " c5"]
    table = {"Hello": (" c1", HIGH)}
    for a, b in zip(words, words[1:]):
        table[a] = (b, HIGH)
    table[" c5"] = (" unsure", 0.3)
    base = ScriptedBase(rules(table, default=(" x", LOW)))
    result = run(base, ScriptedGuide(["Hello big"]), base_chunk=2)
    assert pairs(result)[0] == ("Hello", " c1 c2 c3 c4 c5")
    # One stream per chunk, each continuing the text so far.
    assert base.asked == [BASE_PROMPT + "Hello", BASE_PROMPT + "Hello c1 c2", BASE_PROMPT + "Hello c1 c2 c3 c4"]
    assert result.base_tokens == 5


# -- step 3: the base phase's rules (scripted base) ---------------------------------------


def follows(marker: str, tokens: Sequence[tuple[str, float]], default=(" zz", LOW)):
    """A base that, after the last ``marker`` in the text, writes ``tokens`` ((text, prob)
    pairs) in order and then ends its text; anywhere else it answers ``default``."""

    def rule(text: str) -> tuple[str | None, float]:
        if marker not in text:
            return default
        after, written = text[text.rindex(marker) + len(marker):], ""
        for token, prob in tokens:
            if after == written:
                return token, prob
            written += token
        return (EOS, HIGH) if after == written else default

    return rule


def sure(*texts: str) -> list[tuple[str, float]]:
    return [(t, HIGH) for t in texts]


def test_chunk_already_in_this_rounds_base_text_ends_the_base_phase():
    base = ScriptedBase(sentence(["one", "two", "three"], then_end=False))
    result = run(base, ScriptedGuide(["Start here"]), base_chunk=3)
    # First token " one", first chunk " two three"; the next chunk repeats the round's text.
    assert pairs(result) == [("Start", " one two three"), ("", "")]
    assert base.asked == [BASE_PROMPT + "Start", BASE_PROMPT + "Start one two three"]
    assert result.base_tokens == 3
    assert result.text == "Start one two three"


def test_the_rounds_first_base_token_is_kept_when_rule_c_drops_its_chunk():
    # The traced case: after "Therefore," the base repeats an earlier line. Its first token
    # " James" stays (it made the base ready); only the rest of the chunk is refused.
    line = " James runs 1440 meters a week."
    base = ScriptedBase(follows("Therefore,", sure(*word_tokens(line)) + [(" x", LOW)]))
    result = run(base, ScriptedGuide(["So" + line + " Then", " Therefore, James"]))
    assert pairs(result) == [("So" + line, ""), (" Therefore,", " James"), ("", "")]
    assert result.text == "So" + line + " Therefore, James"
    assert result.base_tokens == 1


def test_rule_a_on_the_first_chunk_keeps_the_first_token():
    # base_chunk 2: the first chunk is the one token after the first; it repeats the round's
    # text (the first token), so the phase ends with the first token alone.
    base = ScriptedBase(follows("Start", sure(*[" la"] * 20)))
    result = run(base, ScriptedGuide(["Start here"]), base_chunk=2)
    assert pairs(result)[0] == ("Start", " la")
    assert base.asked == [BASE_PROMPT + "Start"]


def test_base_chunk_one_gives_one_base_token_per_round():
    # The first chunk of a one-token response is empty, and the empty text always repeats.
    base = ScriptedBase(follows("Start", sure(" a", " b", " c", " d")))
    result = run(base, ScriptedGuide(["Start here", " b c", " d e"]), base_chunk=1)
    assert pairs(result) == [("Start", " a"), (" b", " c"), (" d", ""), ("", "")]
    assert result.base_tokens == 2 and base.steps_decoded == 2


def test_rule_a_compares_the_whole_chunk_past_its_unsure_token():
    # Second chunk: " b" (sure), " c" (unsure), " e f". Its accepted text " b" occurs in the
    # round's text " a b c d", its whole text " b c e f" does not: " b" is appended.
    base = ScriptedBase(follows("Start", sure(" a", " b", " c", " d", " b") + [(" c", LOW)] + sure(" e", " f")))
    result = run(base, ScriptedGuide(["Start here"]), base_chunk=4)
    assert pairs(result)[0] == ("Start", " a b c d b")
    assert base.steps_decoded == 1 + 3 + 4  # the check, the first chunk, all of the second
    # Whole text " a b c" in the round's text: nothing of that chunk is added.
    base = ScriptedBase(follows("Start", sure(" a", " b", " c", " a") + [(" b", LOW)] + sure(" c")))
    result = run(base, ScriptedGuide(["Start here"]), base_chunk=3)
    assert pairs(result)[0] == ("Start", " a b c")
    assert base.steps_decoded == 1 + 2 + 3


@pytest.mark.parametrize("second_chunk, kept, read", [
    ([(" q", HIGH), (" r", LOW), (" s", HIGH), (" t", HIGH)], " q", 2),  # " q" is new: (a) cannot fire
    ([(" r", LOW), (" b", HIGH), (" c", HIGH), (" d", HIGH)], "", 1),  # nothing accepted, nothing to add
    ([(" b", HIGH), (" r", LOW), (" s", HIGH), (" t", HIGH)], " b", 4),  # " b" repeats: read the whole chunk
])
def test_tokens_past_the_unsure_one_are_read_only_when_rule_a_needs_them(second_chunk, kept, read):
    base = ScriptedBase(follows("Start", sure(" a", " b", " c", " d") + second_chunk))
    result = run(base, ScriptedGuide(["Start here"]), base_chunk=4)
    assert pairs(result)[0] == ("Start", " a b c d" + kept)
    assert base.steps_decoded == 1 + 3 + read


def test_a_long_repeat_is_dropped_without_reading_past_its_unsure_token():
    # The second chunk's accepted text " b c d e f g" (7 pieces) is in the round's text:
    # rule (c) drops it whatever rule (a) would say, so the rest is never read.
    words = [" b", " c", " d", " e", " f", " g"]
    base = ScriptedBase(follows("Start", sure(" a", *words, " h", *words) + [(" h", LOW)] + sure(" i")))
    result = run(base, ScriptedGuide(["Start here"]), base_chunk=8)
    assert pairs(result)[0] == ("Start", " a b c d e f g h")
    assert base.steps_decoded == 1 + 7 + 7


@pytest.mark.parametrize("repeated, dropped", [
    (" runs 1440 meters a week.", True),  # 5 words, 6 pieces: the leading space counts
    (" one\ntwo\nthree\nfour\nfive\nsix", False),  # 6 words, 2 pieces: newlines do not split
])
def test_rule_c_counts_pieces_split_on_single_spaces(repeated, dropped):
    # Round 1's nudging words hold the text; in round 2 it comes back as a whole chunk.
    tokens = word_tokens(repeated)
    filler = [" f1", " f2", " f3", " f4"][: len(tokens) - 2]
    base = ScriptedBase(follows("Then", sure(" he", *filler, " James", *tokens) + [(" x", LOW)]))
    result = run(base, ScriptedGuide(["So did James" + repeated + " Then", " Then he"]), base_chunk=len(tokens))
    opening = " he" + "".join(filler) + " James"
    assert pairs(result)[:2] == [("So did James" + repeated, ""), (" Then", opening + ("" if dropped else repeated))]


def test_chunk_of_more_than_five_pieces_already_in_out_is_dropped():
    # The base says its sentence twice, after "Start" and after "Again"; the second time,
    # the first token stays and the rest of the sentence goes when it has more than 5 pieces.
    for n_words, dropped in [(5, False), (6, True), (8, True)]:
        names = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"][:n_words]
        base = ScriptedBase(sentence(names))
        result = run(base, ScriptedGuide(["Start here", " Again now"]))
        said = "".join(" " + w for w in names)
        assert pairs(result)[0] == ("Start", said)
        assert pairs(result)[1] == (" Again", " alpha" if dropped else said)
        assert result.stop_reason == "guide_stop"


def test_final_text_strips_a_repeated_suffix():
    line = " The_quick_brown_fox_jumps_over_the_lazy_dog."  # one word, 45 characters
    base = ScriptedBase(rules({}, default=(" x", HIGH)))
    result = run(base, ScriptedGuide([line, line]))
    assert pairs(result) == [(line, ""), (line, ""), ("", "")]
    assert joined(result) == line * 2
    assert result.text == line
    assert result.stop_reason == "guide_stop"


# -- step 2, the last word and step 4: stop conditions (scripted) --------------------------


def test_an_empty_last_word_is_not_accepted_either():
    base = ScriptedBase(rules({}, default=(" x", LOW)))
    result = run(base, ScriptedGuide(["Hello world "]))
    assert pairs(result)[0] == ("Hello world", "")
    assert base.asked == [BASE_PROMPT + "Hello"]


def test_repeated_nudging_stops_before_a_fourth_round_of_the_same_words():
    base = ScriptedBase(rules({}, default=(" x", HIGH)))
    seen = []
    result = run(base, ScriptedGuide([" a", " a", " b", " a", " a", " a", " a", " a"]),
                 on_text=lambda piece, role: seen.append(piece))
    assert result.stop_reason == "repeated_nudging"
    assert result.nudging_words == [" a", " a", " b", " a", " a", " a"]
    assert result.text == " a a b a a a"
    assert result.model_calls["guide"] == 7  # the seventh proposal was made, and not appended
    assert "".join(seen) == result.text


def test_three_rounds_of_the_same_words_do_not_stop():
    base = ScriptedBase(rules({}, default=(" x", HIGH)))
    result = run(base, ScriptedGuide([" a", " a", " a", " b"]))
    assert result.stop_reason == "guide_stop"
    assert result.text == " a a a b"


def test_repeated_nudging_counts_rounds_that_had_a_base_phase():
    # Each round: the guide's " So", then the base's one token (it ends its text there).
    base = ScriptedBase(rules({"So": (" x", HIGH), "x": (EOS, HIGH)}, default=(" y", LOW)))
    result = run(base, ScriptedGuide([" So it"] * 6))
    assert pairs(result) == [(" So", " x")] * 3
    assert result.stop_reason == "repeated_nudging"


def test_max_rounds_stops():
    base = ScriptedBase(rules({}, default=(" x", HIGH)))
    guide = ScriptedGuide([f" w{i}" for i in range(10)])
    result = run(base, guide, max_rounds=4)
    assert result.stop_reason == "rounds"
    assert len(result.rounds) == 4 and len(guide.seen) == 4
    assert result.text == " w0 w1 w2 w3"


def test_length_stop_counts_base_tokens_exactly():
    base = ScriptedBase(rules({}, default=(" la", HIGH)))
    result = run(base, ScriptedGuide([" Go on"]), max_tokens=10, base_chunk=16)
    assert result.stop_reason == "length"
    assert pairs(result) == [(" Go", " la" * 9)]
    assert (result.guide_tokens, result.base_tokens, result.tokens) == (1, 9, 10)
    assert result.guide_token_fraction == pytest.approx(0.1)


def test_nudging_words_are_cut_at_the_budget():
    base = ScriptedBase(rules({}, default=(" x", LOW)))  # never ready: no base phase
    guide = ScriptedGuide([" a b c d e", " f g h i j", " k l m n o", " p q"])
    result = run(base, guide, max_tokens=10)
    assert result.stop_reason == "length"
    # 8 tokens before the third round; its words " k l m n" are cut to the 2 that fit.
    assert result.nudging_words == [" a b c d", " f g h i", " k l"]
    assert result.tokens == 10 and result.text == " a b c d f g h i k l"


def test_the_guides_final_text_is_cut_at_the_budget():
    base = ScriptedBase(rules({}, default=(" x", LOW)))
    result = run(base, ScriptedGuide([], final=" one two three four"), max_tokens=3)
    assert (pairs(result), result.stop_reason, result.tokens) == ([(" one two three", "")], "length", 3)
    result = run(base, ScriptedGuide([], final=" one two three four"), max_tokens=4)
    assert (pairs(result), result.stop_reason, result.tokens) == ([(" one two three four", "")], "guide_stop", 4)


def test_words_that_fill_the_budget_leave_no_base_phase():
    base = ScriptedBase(rules({}, default=(" la", HIGH)))  # ready at once
    result = run(base, ScriptedGuide([" Go on", " More of it"]), max_tokens=1)
    assert pairs(result) == [(" Go", "")] and result.stop_reason == "length"
    result = run(base, ScriptedGuide([" Go on"]), max_tokens=2)
    assert pairs(result) == [(" Go", " la")] and result.stop_reason == "length"
    assert base.steps_decoded == 2  # one step each time: the budget ends the reading


def test_length_budget_caps_the_base_phase_across_chunks():
    # Chunks of identical words would trip the same-chunk guard: number the words instead.
    base = ScriptedBase(lambda text: (f" t{len(text.split())}", HIGH))
    result = run(base, ScriptedGuide([" Go on"]), max_tokens=8, base_chunk=3)
    assert result.stop_reason == "length"
    assert (result.guide_tokens, result.base_tokens) == (1, 7)
    assert len(base.asked) == 3  # the check (chunk 1: 3 tokens), chunk 2 (3), chunk 3 (1)


@settings(max_examples=60, deadline=None)
@given(proposals=st.lists(st.lists(st.sampled_from(["a", "bb", "", "c\nd"]), min_size=1, max_size=8)
                          .map(" ".join), max_size=6),
       max_tokens=st.integers(1, 30), base_chunk=st.integers(1, 5), prob=st.sampled_from([LOW, HIGH]))
def test_budget_holds_on_scripted_models(proposals, max_tokens, base_chunk, prob):
    base = ScriptedBase(lambda text: (f" t{len(text) % 7}", prob))
    guide = ScriptedGuide(proposals, final="the end of it all")
    result = run(base, guide, max_tokens=max_tokens, base_chunk=base_chunk)
    assert result.tokens <= max_tokens
    assert result.tokens == sum(base.count_tokens(w) for w in result.nudging_words) + result.base_tokens


# -- a model that fails mid-answer (scripted) ---------------------------------------------


class DyingBase(ScriptedBase):
    """A scripted base whose server dies when it is asked for its ``dies_at``-th step."""

    def __init__(self, rule, dies_at: int) -> None:
        super().__init__(rule)
        self.dies_at = dies_at

    def _decode(self, prompt: str, max_tokens: int):
        for step in super()._decode(prompt, max_tokens):
            if self.steps_decoded >= self.dies_at:
                raise ModelError("http://127.0.0.1:1/v1 is gone")
            yield step


def test_a_model_failing_mid_answer_returns_the_answer_so_far():
    numbered = lambda text: (f" t{len(text.split())}", HIGH)  # noqa: E731
    seen: list[str] = []
    # Steps: 1 the check, 2-3 the first chunk, 4-6 the second chunk, which dies at 6.
    base = DyingBase(numbered, dies_at=6)
    result = run(base, ScriptedGuide([" Go on", " More now"]), base_chunk=3,
                 on_text=lambda piece, role: seen.append(piece))
    assert result.stop_reason == "error" and result.error == "http://127.0.0.1:1/v1 is gone"
    assert pairs(result) == [(" Go", " t4 t5 t6")]  # the words and the base text accepted so far
    assert "".join(seen) == result.text == " Go t4 t5 t6"
    assert (result.guide_tokens, result.base_tokens) == (1, 3)
    assert result.to_dict()["error"] == result.error
    # Round 1 as before, but the base ends its text after " t6"; round 2's readiness
    # question (step 4) dies: round 2 has no decided words, round 1 is all there.
    base = DyingBase(lambda text: (EOS, HIGH) if len(text.split()) == 7 else numbered(text), dies_at=4)
    result = run(base, ScriptedGuide([" Go on", " More now"]), base_chunk=3)
    assert (pairs(result), result.stop_reason, result.text) == ([(" Go", " t4 t5 t6")], "error", " Go t4 t5 t6")


def test_a_round_whose_words_cannot_be_counted_is_left_out():
    class DeadCountingBase(DyingBase):
        def count_tokens(self, text: str) -> int:
            if self.steps_decoded >= self.dies_at:
                raise ModelError("http://127.0.0.1:1/v1 is gone")
            return super().count_tokens(text)

    numbered = lambda text: (f" t{len(text.split())}", HIGH)  # noqa: E731
    # Round 1 as in the test before, the base ending its text after " t6"; round 2's words,
    # far from the budget, are to be counted once its base stream closes, but the server
    # dies in that stream (step 5, after the readiness question).
    base = DeadCountingBase(lambda text: (EOS, HIGH) if len(text.split()) == 7 else numbered(text), dies_at=5)
    result = run(base, ScriptedGuide([" Go on", " More now"]), base_chunk=3)
    assert result.stop_reason == "error"
    assert (pairs(result), result.text, result.tokens) == ([(" Go", " t4 t5 t6")], " Go t4 t5 t6", 4)


def test_a_guide_failing_mid_answer_keeps_the_rounds_before():
    class DyingGuide(ScriptedGuide):
        def complete(self, prompts, **kwargs):
            if len(self.seen) == 2:
                raise ModelError("the guide's server is gone")
            return super().complete(prompts, **kwargs)

    base = ScriptedBase(rules({}, default=(" x", LOW)))
    result = run(base, DyingGuide([" a b", " c d", " e f"]))
    assert pairs(result) == [(" a", ""), (" c", "")]
    assert (result.stop_reason, result.error, result.text) == ("error", "the guide's server is gone", " a c")


# -- cost ---------------------------------------------------------------------------------


def test_prefix_reuse_changes_nothing_but_the_cost(tiny_base, tiny_guide):
    """Nudging reads the base through streams it closes after a step or a chunk; their caches
    must still serve the next question, which extends the same text."""
    seen = {"tokens": 0}

    def count(module, args, kwargs):
        seen["tokens"] += kwargs["input_ids"].shape[-1]

    handle = tiny_base.model.register_forward_pre_hook(count, with_kwargs=True)
    results, tokens = {}, {}
    try:
        for reuse in (True, False):
            base = LocalModel(tiny_base.model, tiny_base.tokenizer, name="b", reuse_prefix=reuse)
            seen["tokens"] = 0
            results[reuse] = nudge(base=base, guide=tiny_guide, request=QUESTION, max_tokens=60)
            tokens[reuse] = seen["tokens"]
    finally:
        handle.remove()
    assert pairs(results[True]) == pairs(results[False])
    assert results[True].model_calls == results[False].model_calls
    assert results[True].model_calls["base"] >= 5
    assert tokens[True] < tokens[False] / 3



class CountingBase(ScriptedBase):
    """A scripted base that records the texts it is asked to count."""

    def __init__(self, rule) -> None:
        super().__init__(rule)
        self.counted: list[str] = []

    def count_tokens(self, text: str) -> int:
        self.counted.append(text)
        return super().count_tokens(text)


def test_only_the_nudging_words_are_counted_and_the_cost_is_in_the_result():
    # Not ready after " a" (it disagrees, unsure), ready after " a b" (it agrees on " c");
    # then unsure at once: one round, and the guide ends the answer in the second.
    base = CountingBase(rules({" b": (" c", LOW)}, default=(" x", LOW)))
    result = run(base, ScriptedGuide([" a b c d"]), max_tokens=100)
    assert pairs(result) == [(" a b", " c"), ("", "")] and result.stop_reason == "guide_stop"
    # " a" is never counted: its count cannot matter with the budget this far off.
    assert base.counted == [" a b"] and result.token_counts == 1
    assert result.generated == {"base": 3, "guide": 4}  # " x" | " c", " x"; the proposal
    assert result.to_dict()["generated"] == result.generated


def test_words_near_the_budget_are_counted_before_the_base_is_asked():
    # " a" might take up to 3 tokens (2 bytes and a prefix token): with 16-token chunks and
    # 18 tokens of room, its count decides whether the first chunk fits, so it is counted.
    base = CountingBase(rules({" b": (" c", LOW)}, default=(" x", LOW)))
    result = run(base, ScriptedGuide([" a b c d"]), max_tokens=18, base_chunk=16)
    assert pairs(result) == [(" a b", " c"), ("", "")]
    assert base.counted == [" a", " a b"]
