"""Tests for weak-to-strong search (towline.methods.search, docs/search.md): the maths of CBS and
best-of-N on tiny random models, and the bundled models end to end."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import zlib
from collections.abc import Sequence

import pytest
import torch

import towline
from towline.methods.base import OptionError, Participant
from towline.methods.scorers import FunctionScorer, Scorer, Scoring
from towline.methods.search import BestOfN, ChunkBeamSearch, search_sampling
from towline.models.base import DecodeState, Model, ModelError, Sampling
from towline.prompts import PromptRequest

REQUEST = PromptRequest(question="Tell me about cats.")
PROMPT = "Tell me about cats.\n"
SAMPLING = Sampling(temperature=0.9, top_k=40, seed=11)


def crc(prompt: str, response: str) -> float:
    """A deterministic score that looks random: different texts get unrelated scores."""
    return zlib.crc32(response.encode()) / 2**32


class Recording(Scorer):
    """A real scorer (crc of the text) that records every scoring and reordering it is asked for."""

    spec = "recording"

    def __init__(self) -> None:
        self.events: list[tuple[str, list]] = []

    def start(self, request: PromptRequest, rows: int, *, room: int = 0) -> Scoring:
        scorer = self

        class _Session(Scoring):
            calls = {"recording": 0}
            prompts: dict = {}
            templates: dict = {}

            def score(self, responses: Sequence[str]) -> list[float]:
                self.calls["recording"] += 1
                scores = [crc("", r) for r in responses]
                scorer.events.append(("score", list(zip(responses, scores))))
                return scores

            def reorder(self, rows: Sequence[int]) -> None:
                scorer.events.append(("reorder", list(rows)))

        return _Session()


def search(model: Model, method, sampling: Sampling = SAMPLING, request: PromptRequest = REQUEST):
    return method.run(request, {"base": Participant(model, sampling)})


# -- the maths -------------------------------------------------------------------------------


@pytest.mark.parametrize("l", [0, 7])
def test_one_candidate_is_plain_sampling_with_the_same_seed(tiny_base, l):
    # W = K = 1: every selection keeps the one candidate, whatever L is.
    result = search(tiny_base, ChunkBeamSearch(w=1, k=1, l=l, max_tokens=40, scorer=FunctionScorer(crc)))
    plain = tiny_base.complete([PROMPT], max_tokens=40, sampling=SAMPLING)[0]
    assert result.text == plain.text and result.tokens == len(plain.steps)
    assert result.sampling == {"temperature": 0.9, "top_p": 1.0, "top_k": 40, "seed": 11}


def test_selection_keeps_the_top_w_scores(tiny_base):
    scorer = Recording()
    w, k = 3, 2
    result = search(tiny_base, ChunkBeamSearch(w=w, k=k, l=5, max_tokens=23, scorer=scorer, all_candidates=True))
    scored = [event for kind, event in scorer.events if kind == "score"]
    orders = [event for kind, event in scorer.events if kind == "reorder"]
    assert len(scored) == len(orders) == result.selections == 5  # chunks of 5, 5, 5, 5, 3
    for round_, (candidates, order) in enumerate(zip(scored, orders)):
        ranked = sorted(range(w * k), key=lambda row: -candidates[row][1])[:w]
        assert order == [ranked[i % w] for i in range(w * k)]
        if round_ + 1 < len(scored):  # the next chunk grows the kept candidates
            for row, kept in enumerate(order):
                assert scored[round_ + 1][row][0].startswith(candidates[kept][0])
    last = scored[-1]
    best = sorted(last, key=lambda c: -c[1])[:w]
    assert [(c.text, c.score) for c in result.candidates] == best
    assert (result.text, result.score) == best[0]
    assert result.model_calls == {"base": 5, "recording": 5}


def test_best_of_n_is_cbs_with_one_beam_and_unbounded_chunks(tiny_base):
    bon = search(tiny_base, BestOfN(n=4, max_tokens=12, scorer=FunctionScorer(crc), all_candidates=True))
    cbs = search(tiny_base, ChunkBeamSearch(w=1, k=4, l=0, max_tokens=12, scorer=FunctionScorer(crc)))
    assert bon.text == cbs.text and bon.score == cbs.score
    assert bon.selections == 1 and bon.model_calls == {"base": 1, "function": 1}
    # N independent samples: the four plain samples of one batch, and the best of them wins.
    samples = tiny_base.complete([PROMPT] * 4, max_tokens=12, sampling=SAMPLING)
    assert bon.text == max((s.text for s in samples), key=lambda t: crc("", t))
    assert bon.candidate_tokens == sum(len(s.steps) for s in samples)


def test_a_chunk_longer_than_the_budget_is_one_selection(tiny_base):
    long = search(tiny_base, ChunkBeamSearch(w=2, k=3, l=50, max_tokens=9, scorer=FunctionScorer(crc)))
    unbounded = search(tiny_base, ChunkBeamSearch(w=2, k=3, l=0, max_tokens=9, scorer=FunctionScorer(crc)))
    assert (long.text, long.score, long.selections) == (unbounded.text, unbounded.score, 1)
    assert long.model_calls == {"base": 1, "function": 1} and long.candidate_tokens == 6 * 9


def test_one_successor_each_keeps_every_candidate_ranked(tiny_base):
    # K = 1: the W candidates never compete away; each selection only puts them in score order.
    scorer = Recording()
    result = search(tiny_base, ChunkBeamSearch(w=3, k=1, l=4, max_tokens=10, scorer=scorer, all_candidates=True))
    assert result.selections == 3 and [c.tokens for c in result.candidates] == [10, 10, 10]
    orders = [event for kind, event in scorer.events if kind == "reorder"]
    assert all(sorted(order) == [0, 1, 2] for order in orders)
    assert [c.score for c in result.candidates] == sorted((c.score for c in result.candidates), reverse=True)


def test_reordered_cache_gives_the_logits_of_a_recomputed_prefix(tiny_base):
    prompt_ids = tiny_base.encode(PROMPT)
    state = tiny_base.open([PROMPT] * 3)
    rows = [list(prompt_ids) for _ in range(3)]
    generator = torch.Generator().manual_seed(0)
    for step in range(12):
        distributions = state.next(top_logprobs=5)
        tokens = [d.top[int(torch.randint(5, (1,), generator=generator))] for d in distributions]
        state.append(tokens)
        for row, token in zip(rows, tokens):
            row.append(token.id)
        if step in (3, 8):
            order = [2, 2, 0] if step == 3 else [1, 0, 0]
            state.reorder(order)
            rows = [list(rows[i]) for i in order]
    for row, distribution in zip(rows, state.next()):
        with torch.inference_mode():
            logits = tiny_base.model(input_ids=torch.tensor([row])).logits[0, -1]
        assert torch.allclose(torch.from_numpy(distribution.full), torch.log_softmax(logits, -1), atol=1e-4)


def test_the_budget_is_never_exceeded_and_an_ended_candidate_stays_ended(tiny_base, eos_biased):
    result = search(tiny_base, ChunkBeamSearch(w=2, k=2, l=4, max_tokens=10, scorer=FunctionScorer(crc),
                                               all_candidates=True))
    assert result.stop_reason == "length" and result.tokens == 10
    assert all(c.tokens == 10 for c in result.candidates) and result.candidate_tokens == 4 * 10
    ending = eos_biased(tiny_base, 1e4)
    result = search(ending, ChunkBeamSearch(w=2, k=2, l=4, max_tokens=10, scorer=FunctionScorer(crc)))
    assert (result.text, result.stop_reason, result.tokens, result.selections) == ("", "end", 0, 1)


def test_greedy_settings_mean_the_papers_sampling(tiny_base):
    result = search(tiny_base, BestOfN(n=2, max_tokens=3, scorer=FunctionScorer(crc)), sampling=Sampling(seed=1))
    assert result.sampling == {"temperature": 0.7, "top_p": 1.0, "top_k": 50, "seed": 1}
    assert search_sampling(Sampling(temperature=1.2, top_k=5)) == Sampling(temperature=1.2, top_k=5)


class FailingModel(Model):
    """``tiny_base`` whose decode state fails (a lost server) after ``after`` next-token reads."""

    def __init__(self, model: Model, after: int) -> None:
        self._model, self._after = model, after
        self.name, self.end_ids = "failing", model.end_ids

    def open(self, prompts):
        inner, failing = self._model.open(prompts), self

        class _State(DecodeState):
            def next(self, *, top_logprobs=20):
                failing._after -= 1
                if failing._after < 0:
                    raise ModelError("the server went away")
                return inner.next(top_logprobs=top_logprobs)

            def append(self, tokens):
                inner.append(tokens)

            def extend(self, tokens, *, top_logprobs=20):
                return inner.extend(tokens, top_logprobs=top_logprobs)

            def truncate(self, counts):
                inner.truncate(counts)

            def reorder(self, rows):
                inner.reorder(rows)

            @property
            def texts(self):
                return inner.texts

            def close(self):
                inner.close()

        return _State()

    def complete(self, *args, **kwargs):
        return self._model.complete(*args, **kwargs)

    def stream(self, *args, **kwargs):
        return self._model.stream(*args, **kwargs)

    def score(self, *args, **kwargs):
        return self._model.score(*args, **kwargs)

    def count_tokens(self, text):
        return self._model.count_tokens(text)


def test_a_model_failing_mid_answer_keeps_the_best_partial_answer(tiny_base):
    scorer = Recording()
    result = search(FailingModel(tiny_base, after=8), ChunkBeamSearch(w=2, k=2, l=5, max_tokens=20, scorer=scorer))
    assert result.stop_reason == "error" and "went away" in result.error
    first_selection = [event for kind, event in scorer.events if kind == "score"]
    assert len(first_selection) == 1
    assert (result.text, result.score) == max(first_selection[0], key=lambda c: c[1])
    assert result.tokens == 5
    result = search(FailingModel(tiny_base, after=2), ChunkBeamSearch(max_tokens=20, scorer=FunctionScorer(crc)))
    assert (result.stop_reason, result.text, result.score) == ("error", "", None)


# -- options and composition -----------------------------------------------------------------


def test_bad_options_are_refused_before_anything_loads():
    for options, message in [({"w": 0}, "w: must be at least 1"), ({"l": -1}, "l: must be at least 1"),
                             ({"scorer": "beam:x"}, "scorer: unknown scorer"),
                             ({"scorer": "function:no_such_module_here:f"}, "cannot import"),
                             ({"tuned_template": "chatmll"}, "tuned_template: unknown template"),
                             ({"scorer": "function:math:hypot", "tuned_system": "Be nice."},
                              "tuned_system: only applies to implicit scorers, not to function ones"),
                             ({"scorer": Recording(), "untuned_template": "plain"},
                              "untuned_template: only applies to a scorer given as an implicit")]:
        with pytest.raises(OptionError, match=message):
            ChunkBeamSearch(**options)
    with pytest.raises(OptionError, match="n: must be at least 1"):
        BestOfN(n=0)


def test_compose_opens_the_scorer_once_and_closes_what_it_opened(tiny_base, tmp_path, monkeypatch):
    (tmp_path / "opened.py").write_text("def score(prompt, response):\n    return len(response)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with towline.compose(method="bon", base=tiny_base, scorer="function:opened:score", n=2, max_tokens=4,
                         sampling=SAMPLING) as aligned:
        scorer = aligned.method._scorer
        first, second = aligned.generate("Hi"), aligned.generate("Ho")
        assert aligned.method._scorer is scorer  # the second answer reused the scorer opened for the first
        assert first.scorer == second.scorer == "function:opened:score"
    assert aligned.method._scorer is None
    given = Recording()
    with towline.compose(method="cbs", base=tiny_base, scorer=given, max_tokens=2, sampling=SAMPLING) as aligned:
        aligned.generate("Hi")
    assert given.events  # an open scorer passed in is used as it is


# -- the bundled models ------------------------------------------------------------------------


@pytest.mark.real_models
def test_one_candidate_is_plain_sampling_on_the_real_base(gemma_base):
    sampling = Sampling(temperature=0.7, top_k=50, seed=609)
    result = search(gemma_base, ChunkBeamSearch(w=1, k=1, l=10, max_tokens=30, scorer=FunctionScorer(crc)),
                    sampling=sampling)
    assert result.text == gemma_base.complete([PROMPT], max_tokens=30, sampling=sampling)[0].text


@pytest.mark.real_models
@pytest.mark.parametrize("method", [["--method", "cbs", "--w", "2", "--k", "2", "--l", "4"],
                                    ["--method", "bon", "--n", "4"]])
def test_the_command_line_searches_offline(installed, method):
    installed("gemma-3-270m")
    installed("smollm2-135m-instruct")
    done = subprocess.run([sys.executable, "-m", "towline.cli", "generate", *method, "--base", "gemma-3-270m", "--scorer",
                       "implicit:smollm2-135m-instruct,smollm2-135m-instruct", "--tuned-template", "chatml",
                       "--untuned-template", "chatml", "--tuned-system", "Be positive.", "--max-tokens", "8",
                       "--seed", "3", "--prompt", "My day was", "--json"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert isinstance(result["score"], float) and result["seconds"] > 0 and result["tokens"] <= 8
    assert result["model_calls"]["base"] >= 1 and result["model_calls"]["tuned"] == result["selections"]
    assert "Be positive." in result["prompts"]["tuned"] and "Be positive." not in result["prompts"]["untuned"]


@pytest.mark.real_models
def test_search_over_a_server_draws_among_the_listed_tokens(gemma_url):
    from towline.models.openai import OpenAIModel

    served = OpenAIModel("gemma-3-270m", base_urls=[gemma_url])
    scorer = Recording()
    result = search(served, ChunkBeamSearch(w=3, k=1, l=2, max_tokens=4, scorer=scorer, all_candidates=True),
                    sampling=Sampling(temperature=0.7, top_k=5, seed=2))
    # A server's decode state lists the top-k tokens with their text: the draw is among them.
    # The end of text shows there as "" (llama.cpp) and ends a candidate; the others run to
    # the budget, one selection per chunk of 2 tokens.
    assert result.stop_reason in ("length", "end") and result.error is None
    assert result.model_calls["recording"] == result.selections <= 2
    assert all(c.tokens == 4 and c.text for c in result.candidates if not c.ended)
    assert all(c.tokens <= 4 for c in result.candidates) and len(result.candidates) == 3


def test_a_search_whose_scorer_holds_local_models_answers_one_at_a_time(tiny_base, tiny_guide, tmp_path):
    """The eval runner and the server run answers side by side only where every model allows:
    a scorer on local weights, kept open across answers, makes the method take turns."""
    from towline.eval.runner import _compose, _Models
    from towline.methods.scorers import ImplicitValue

    with ImplicitValue(tiny_guide, tiny_guide) as local_scorer:
        assert not local_scorer.concurrent
        method = BestOfN(n=2, scorer=local_scorer)
        assert not method.concurrent
        with contextlib.ExitStack() as stack:
            aligned, locks = _compose(stack, _Models(stack), "bon", {"base": tiny_base, "scorer": local_scorer, "n": 2})
            assert len(locks) == 2  # the base's and the method's own
    assert BestOfN(n=2, scorer="implicit:a,b").concurrent  # not open yet: each answer opens its own
