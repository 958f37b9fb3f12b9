"""Tests for towline.models.local: the transformers backend, on tiny random-init Llamas."""

from __future__ import annotations

import functools
import math
from contextlib import closing

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from towline.models.base import ModelError, Sampling, Token
from towline.models.local import LocalModel
from towline.models.together import run_together

PROMPTS = [
    "The capital of France is",
    "Question: What is 2+2?\nAnswer:",
    "Once upon a time, in a land far far away, there lived",
]
# Its greedy continuation re-tokenizes to the very tokens generated (checked where it matters).
ROUND_TRIP_PROMPT = PROMPTS[1]

TOLERANCE = 1e-3
"""Log-probs of one sequence computed in differently shaped passes (one token at a time,
several at once, other rows beside it) differ in the last float32 bits; the tiny models'
log-probs reach -40, where that is ~4e-4."""


class ForwardCounter:
    """Counts the forward calls of a torch module, the input tokens (per row) and the rows
    they saw."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = self.tokens = self.rows = 0
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.tokens += ids.shape[-1]
        self.rows += ids.shape[0]

    def reset(self) -> None:
        self.calls = self.tokens = self.rows = 0

    def remove(self) -> None:
        self._handle.remove()


@pytest.fixture(scope="module")
def fresh(tiny_base) -> LocalModel:
    """tiny_base's weights without prefix reuse or drafts, so each call computes from scratch,
    a token a pass."""
    return LocalModel(tiny_base.model, tiny_base.tokenizer, name="tiny-fresh", reuse_prefix=False, draft=False)


def ids_of(model: LocalModel, text: str) -> list[int]:
    return model.tokenizer(text).input_ids


def full_logprobs(model: LocalModel, ids: list[int]) -> torch.Tensor:
    """Log-softmax of the model at every position of ``ids`` (one plain forward, no cache)."""
    with torch.inference_mode():
        logits = model.model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


# -- complete -----------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_complete_equals_generate(fresh, prompt):
    completion = fresh.complete([prompt], max_tokens=12)[0]
    ids = ids_of(fresh, prompt)
    with torch.inference_mode():
        out = fresh.model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=12, do_sample=False, pad_token_id=fresh.pad_id,
        )
    expected = out[0, len(ids):].tolist()
    assert [s.token.id for s in completion.steps] == expected
    assert completion.text == fresh.tokenizer.decode(expected, skip_special_tokens=True)
    assert completion.finish_reason == "length"
    assert not completion.ended


def test_batch_with_left_padding_equals_one_at_a_time(fresh):
    assert len({len(ids_of(fresh, p)) for p in PROMPTS}) == len(PROMPTS)  # really ragged
    batch = fresh.complete(PROMPTS, max_tokens=10, top_logprobs=3)
    single = [fresh.complete([p], max_tokens=10, top_logprobs=3)[0] for p in PROMPTS]
    assert [c.text for c in batch] == [c.text for c in single]
    for b, s in zip(batch, single):
        assert [x.token.id for x in b.steps] == [x.token.id for x in s.steps]
        assert [x.token.logprob for x in b.steps] == pytest.approx(
            [x.token.logprob for x in s.steps], abs=1e-4)
        assert [[t.id for t in x.top] for x in b.steps] == [[t.id for t in x.top] for x in s.steps]


def test_empty_batch_and_zero_tokens(fresh):
    assert fresh.complete([], max_tokens=5) == []
    (c,) = fresh.complete(["Hi"], max_tokens=0)
    assert (c.text, c.steps, c.finish_reason) == ("", [], "length")


def test_finish_reason_length_gives_exactly_max_tokens(fresh):
    (c,) = fresh.complete([PROMPTS[0]], max_tokens=7)
    assert c.finish_reason == "length" and len(c.steps) == 7


def test_stop_string_cuts_text(fresh):
    prompt = ROUND_TRIP_PROMPT
    (full,) = fresh.complete([prompt], max_tokens=12)
    # A stop string made of the text of the 5th and 6th tokens.
    pieces = [s.token.text for s in full.steps]
    stop = (pieces[4] + pieces[5]).strip() or pieces[5]
    assert stop and full.text.find(stop) > 0
    (c,) = fresh.complete([prompt], max_tokens=12, stop=[stop, "never there"])
    assert c.finish_reason == "stop"
    assert c.text == full.text[: full.text.find(stop)]
    assert stop not in c.text
    # Decoding stopped at the token that completed the stop string.
    made = "".join(pieces[: len(c.steps)])
    assert stop in made and stop not in "".join(pieces[: len(c.steps) - 1])
    assert [s.token.id for s in c.steps] == [s.token.id for s in full.steps[: len(c.steps)]]


def eos_position(model: LocalModel, prompt: str, n: int, *, earliest: int = 3) -> tuple[int, float]:
    """A step k of the greedy run and an EOS bias that makes EOS win exactly at step k."""
    (c,) = model.complete([prompt], max_tokens=n)
    ids = ids_of(model, prompt)
    gen = [s.token.id for s in c.steps]
    eos = model.tokenizer.eos_token_id
    with torch.inference_mode():
        logits = model.model(input_ids=torch.tensor([ids + gen])).logits[0, len(ids) - 1:].float()
    gaps = []
    for row in logits:
        best_other = torch.cat([row[:eos], row[eos + 1:]]).max()
        gaps.append((best_other - row[eos]).item())
    best = None
    for k in range(earliest, n):
        margin = min(gaps[:k]) - gaps[k]
        if margin > 0.5 and (best is None or margin > best[1]):
            best = (k, margin)
    assert best is not None, "no step where EOS can be made to win alone"
    k = best[0]
    return k, (min(gaps[:k]) + gaps[k]) / 2


def test_finish_reason_end(fresh, eos_biased):
    prompt = PROMPTS[2]
    k, bias = eos_position(fresh, prompt, 16)
    ending = eos_biased(fresh, bias)
    (plain,) = fresh.complete([prompt], max_tokens=16)
    (c,) = ending.complete([prompt], max_tokens=16)
    assert c.finish_reason == "end" and c.ended
    assert len(c.steps) == k  # EOS itself is not a step
    assert [s.token.id for s in c.steps] == [s.token.id for s in plain.steps[:k]]
    assert c.text == fresh.tokenizer.decode([s.token.id for s in plain.steps[:k]])
    # Asked for fewer tokens than it takes to get there: "length".
    assert ending.complete([prompt], max_tokens=k)[0].finish_reason == "length"
    # In a batch, the row that ends stops growing while the other goes on.
    rows = ending.complete([prompt, PROMPTS[0]], max_tokens=16)
    assert rows[0].text == c.text and rows[0].finish_reason == "end"
    assert rows[1].text == ending.complete([PROMPTS[0]], max_tokens=16)[0].text
    # A model that ends at once has an empty text and no steps.
    (empty,) = eos_biased(fresh, 1e4).complete([prompt], max_tokens=5)
    assert (empty.text, empty.steps, empty.finish_reason) == ("", [], "end")


def test_top1_prob_and_top_match_softmax(fresh):
    prompt = PROMPTS[0]
    (c,) = fresh.complete([prompt], max_tokens=10, top_logprobs=5)
    ids = ids_of(fresh, prompt)
    gen = [s.token.id for s in c.steps]
    logprobs = full_logprobs(fresh, ids + gen)[len(ids) - 1: -1]
    for step, row in zip(c.steps, logprobs):
        assert step.top1_prob == pytest.approx(math.exp(row.max().item()), rel=1e-4)
        assert step.top[0].id == step.token.id == int(row.argmax())
        assert step.token.logprob == pytest.approx(row[step.token.id].item(), abs=1e-4)
        assert len(step.top) == 5
        assert [t.logprob for t in step.top] == sorted((t.logprob for t in step.top), reverse=True)
        assert [t.id for t in step.top] == row.topk(5).indices.tolist()
    # Greedy probabilities are not all ~1: the tiny model is a meaningful test subject.
    assert min(s.top1_prob for s in c.steps) < 0.9


def test_sampling_is_repeatable_and_depends_on_seed(fresh):
    def sample(seed):
        sampling = Sampling(temperature=1.5, seed=seed)
        return fresh.complete([PROMPTS[0]], max_tokens=15, sampling=sampling)[0].text

    assert sample(3) == sample(3)
    assert len({sample(seed) for seed in range(5)}) > 1
    greedy = fresh.complete([PROMPTS[0]], max_tokens=15)[0].text
    assert any(sample(seed) != greedy for seed in range(5))
    # stream samples the same tokens as complete for one prompt.
    streamed = [s.token.id for s in fresh.stream(PROMPTS[0], max_tokens=15,
                                                  sampling=Sampling(temperature=1.5, seed=3))]
    completed = fresh.complete([PROMPTS[0]], max_tokens=15, sampling=Sampling(temperature=1.5, seed=3))[0]
    assert streamed == [s.token.id for s in completed.steps]


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    temperature=st.floats(0.3, 3.0),
    top_k=st.sampled_from([0, 1, 2, 5, 40]),
    top_p=st.sampled_from([1.0, 0.9, 0.5, 0.2, 0.01]),
)
def test_sampled_tokens_lie_in_top_k_and_nucleus(fresh, seed, temperature, top_k, top_p):
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    (c,) = fresh.complete([PROMPTS[0]], max_tokens=6, sampling=sampling, top_logprobs=3)
    ids = ids_of(fresh, PROMPTS[0])
    gen = [s.token.id for s in c.steps]
    with torch.inference_mode():
        logits = fresh.model(input_ids=torch.tensor([ids + gen])).logits[0, len(ids) - 1: -1].double()
    for step, row in zip(c.steps, logits):
        scores = row / temperature
        order = scores.argsort(descending=True)
        rank = (order == step.token.id).nonzero().item()
        if top_k:
            assert rank < top_k
            kept = order[:top_k]
        else:
            kept = order
        probs = torch.softmax(scores[kept], dim=-1)  # renormalised over the top-k
        above = probs[:rank].sum().item()  # mass of the tokens more likely than the sampled one
        assert above < top_p + 1e-6, "sampled outside the nucleus"
        # The reported log-prob is under the distribution actually sampled from.
        nucleus = probs[: int((probs.cumsum(0) - probs < top_p).sum())]
        expected = math.log(probs[rank].item() / nucleus.sum().item())
        assert step.token.logprob == pytest.approx(expected, abs=1e-3)
        assert step.top1_prob == pytest.approx(probs[0].item() / nucleus.sum().item(), abs=1e-3)


# -- stream -------------------------------------------------------------------------------


def test_stream_yields_the_steps_of_complete(fresh):
    for prompt in PROMPTS[:2]:
        (c,) = fresh.complete([prompt], max_tokens=10, top_logprobs=3)
        streamed = list(fresh.stream(prompt, max_tokens=10, top_logprobs=3))
        assert [s.token.id for s in streamed] == [s.token.id for s in c.steps]
        assert [s.token.text for s in streamed] == [s.token.text for s in c.steps]
        assert [[t.id for t in s.top] for s in streamed] == [[t.id for t in s.top] for s in c.steps]
        assert [s.token.logprob for s in streamed] == pytest.approx([s.token.logprob for s in c.steps], abs=1e-5)


def test_stream_ends_at_end_of_text(fresh, eos_biased):
    k, bias = eos_position(fresh, PROMPTS[2], 16)
    ending = eos_biased(fresh, bias)
    assert len(list(ending.stream(PROMPTS[2], max_tokens=50))) == k


def test_closing_a_stream_stops_computing(fresh):
    counter = ForwardCounter(fresh.model)
    try:
        stream = fresh.stream(PROMPTS[0], max_tokens=200)
        with closing(stream):
            first = [next(stream) for _ in range(3)]
        calls = counter.calls
        assert calls == 3  # the prompt, then one token per further step
        with pytest.raises(StopIteration):
            next(stream)
        assert counter.calls == calls
        counter.reset()
        assert len(list(fresh.stream(PROMPTS[0], max_tokens=10))) == 10
        assert counter.calls == 10
    finally:
        counter.remove()
    assert [s.token.id for s in first] == [s.token.id for s in fresh.complete([PROMPTS[0]], max_tokens=3)[0].steps]


# -- score --------------------------------------------------------------------------------


def test_score_of_greedy_completion_matches_decoding(fresh):
    prompt = ROUND_TRIP_PROMPT
    (c,) = fresh.complete([prompt], max_tokens=12, top_logprobs=2)
    gen = [s.token.id for s in c.steps]
    assert ids_of(fresh, prompt + c.text) == ids_of(fresh, prompt) + gen  # precondition
    (scored,) = fresh.score([prompt], [c.text], top_logprobs=2)
    assert [s.token.id for s in scored.steps] == gen
    assert [s.token.logprob for s in scored.steps] == pytest.approx([s.token.logprob for s in c.steps], abs=1e-4)
    assert scored.logprob == pytest.approx(sum(s.token.logprob for s in c.steps), abs=1e-3)
    assert all(s.top[0].id == s.token.id for s in scored.steps)
    assert "".join(s.token.text for s in scored.steps) == c.text


def test_score_verifies_a_drafted_run_in_one_pass(fresh):
    prompt = ROUND_TRIP_PROMPT
    (c,) = fresh.complete([prompt], max_tokens=8)
    gen = [s.token.id for s in c.steps]
    wrong = fresh.tokenizer(" banana", add_special_tokens=False).input_ids[0]
    assert wrong != gen[3]
    draft_ids = gen[:3] + [wrong] + gen[4:]
    draft = fresh.tokenizer.decode(draft_ids)
    assert ids_of(fresh, prompt + draft) == ids_of(fresh, prompt) + draft_ids  # precondition
    counter = ForwardCounter(fresh.model)
    try:
        (scored,) = fresh.score([prompt], [draft])
    finally:
        counter.remove()
    assert counter.calls == 1
    agree = [s.top[0].id == s.token.id for s in scored.steps]
    assert agree[:4] == [True, True, True, False]
    assert scored.steps[3].top[0].id == gen[3]  # where the draft went wrong, the model's own token
    # The log-probs are those of the full-sequence softmax.
    ids = ids_of(fresh, prompt)
    reference = full_logprobs(fresh, ids + draft_ids)[len(ids) - 1: -1]
    expected = [reference[i, t].item() for i, t in enumerate(draft_ids)]
    assert [s.token.logprob for s in scored.steps] == pytest.approx(expected, abs=1e-4)


def test_score_batch_and_empty_continuation(fresh):
    results = fresh.score([PROMPTS[0], PROMPTS[1]], [" Paris", ""])
    assert len(results[0].steps) == fresh.count_tokens(" Paris")
    assert results[1].steps == [] and results[1].logprob == 0
    with pytest.raises(ValueError):
        fresh.score([PROMPTS[0]], [" a", " b"])


# -- open / DecodeState -------------------------------------------------------------------


def test_decode_state_follows_greedy_decoding(fresh):
    prompts = [PROMPTS[0], PROMPTS[1]]
    expected = fresh.complete(prompts, max_tokens=4)
    state = fresh.open(prompts)
    vocab = len(fresh.tokenizer)
    for position in range(4):
        dists = state.next(top_logprobs=3)
        tokens = []
        for row, dist in enumerate(dists):
            step = expected[row].steps[position]
            assert dist.full is not None and dist.full.shape == (vocab,)
            assert np.exp(dist.full).sum() == pytest.approx(1.0, abs=1e-4)
            assert int(dist.full.argmax()) == dist.top[0].id == step.token.id
            assert dist.top[0].logprob == pytest.approx(step.token.logprob, abs=1e-4)
            assert dist.top[0].text == step.token.text
            tokens.append(dist.top[0])
        state.append(tokens)
    assert state.texts == [c.text for c in expected]


def test_decode_state_reorder_matches_fresh_states(fresh):
    p0, p1 = PROMPTS[0], PROMPTS[1]
    state = fresh.open([p0, p1])
    first = [d.top[0] for d in state.next()]
    state.append(first)
    state.reorder([1, 1, 0])
    assert state.texts == [first[1].text, first[1].text, first[0].text]
    reference = fresh.open([p1, p1, p0])
    reference.append([first[1], first[1], first[0]])
    for _ in range(3):
        got, want = state.next(), reference.next()
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.full, w.full, atol=1e-4)
            assert g.top[0].id == w.top[0].id
        # Rows 0 and 1 are copies: they stay identical.
        np.testing.assert_allclose(got[0].full, got[1].full, atol=1e-6)
        chosen = [d.top[0] for d in got]
        state.append(chosen)
        reference.append(chosen)
    assert state.texts == reference.texts
    # Diverging copies: give the two copies different tokens and compare again with fresh states.
    alt = state.next(top_logprobs=2)[1].top[1]
    tokens = [state.next()[0].top[0], alt, state.next()[2].top[0]]
    state.append(tokens)
    reference.append(tokens)
    # The reference feeds its last two tokens in one pass (appends wait for a next()),
    # the state one by one: equal up to float rounding.
    for g, w in zip(state.next(), reference.next()):
        np.testing.assert_allclose(g.full, w.full, atol=TOLERANCE)


def test_rows_of_one_prompt_read_it_once_and_each_decodes_as_alone(fresh):
    counter = ForwardCounter(fresh.model)
    try:
        state = fresh.open([PROMPTS[0]] * 3)
    finally:
        counter.remove()
    assert (counter.calls, counter.rows, counter.tokens) == (1, 1, len(ids_of(fresh, PROMPTS[0])))
    # Each row takes another of the best tokens, and goes on as a state of its own would.
    first = state.next(top_logprobs=3)
    chosen = list(first[0].top)
    state.append(chosen)
    for row, token in enumerate(chosen):
        np.testing.assert_allclose(first[row].full, first[0].full, atol=1e-6)
        alone = fresh.open([PROMPTS[0]])
        alone.append([token])
        np.testing.assert_allclose(state.next()[row].full, alone.next()[0].full, atol=TOLERANCE)


def test_decode_state_needs_token_ids(fresh):
    state = fresh.open([PROMPTS[0]])
    with pytest.raises(ValueError):
        state.append([Token(" x", -1.0)])


def greedy_ids(model: LocalModel, prompt: str, n: int) -> list[int]:
    return [s.token.id for s in model.complete([prompt], max_tokens=n)[0].steps]


def assert_matches_recomputed(model: LocalModel, prompt: str, appended: list[int], dist) -> None:
    """``dist`` is what a plain forward over prompt + appended (no cache) predicts next."""
    expected = full_logprobs(model, ids_of(model, prompt) + appended)[-1]
    np.testing.assert_allclose(dist.full, expected.numpy(), atol=TOLERANCE)
    assert dist.top[0].id == int(expected.argmax())


def test_reordered_cache_gives_the_logits_of_a_recomputed_prefix(fresh):
    prompts = [PROMPTS[0], PROMPTS[1]]
    runs = [greedy_ids(fresh, p, 3) for p in prompts]
    with fresh.open(prompts) as state:
        for position in range(2):
            state.append([run[position] for run in runs])
        state.reorder([1, 0, 0])
        state.append([runs[1][2], runs[0][2], runs[1][2]])  # row 2 leaves row 1's path
        got = state.next()
    assert_matches_recomputed(fresh, PROMPTS[1], runs[1], got[0])
    assert_matches_recomputed(fresh, PROMPTS[0], runs[0], got[1])
    assert_matches_recomputed(fresh, PROMPTS[0], runs[0][:2] + [runs[1][2]], got[2])


def test_append_takes_ids_and_records_their_text(fresh):
    run = greedy_ids(fresh, ROUND_TRIP_PROMPT, 6)
    with fresh.open([ROUND_TRIP_PROMPT]) as state:
        for token_id in run:
            state.append([token_id])
        assert state.texts == [fresh.complete([ROUND_TRIP_PROMPT], max_tokens=6)[0].text]
        assert_matches_recomputed(fresh, ROUND_TRIP_PROMPT, run, state.next()[0])


def test_extend_equals_appending_step_by_step_in_one_pass(fresh):
    prompts = PROMPTS
    drafts = [greedy_ids(fresh, PROMPTS[0], 5), [], greedy_ids(fresh, PROMPTS[2], 3)]  # ragged, one empty
    drafts[0][2] = fresh.tokenizer(" banana", add_special_tokens=False).input_ids[0]  # off the model's path
    stepwise = []  # per row: next() after each appended token, one state per row
    for prompt, draft in zip(prompts, drafts):
        with fresh.open([prompt]) as single:
            row = []
            for token_id in draft:
                single.append([token_id])
                row.append(single.next(top_logprobs=3)[0])
            stepwise.append(row)
    counter = ForwardCounter(fresh.model)
    try:
        with fresh.open(prompts) as state:
            counter.reset()
            got = state.extend(drafts, top_logprobs=3)
            assert counter.calls == 1
            after = state.next(top_logprobs=3)
            assert counter.calls == 1  # next() after extend needs no forward
            for row, draft in enumerate(drafts):
                assert len(got[row]) == len(draft)
                for g, e in zip(got[row], stepwise[row]):
                    np.testing.assert_allclose(g.full, e.full, atol=TOLERANCE)
                    assert [t.id for t in g.top] == [t.id for t in e.top]
                    assert [t.text for t in g.top] == [t.text for t in e.top]
                for k, g in enumerate(got[row]):
                    assert_matches_recomputed(fresh, prompts[row], draft[: k + 1], g)
                if draft:
                    np.testing.assert_allclose(after[row].full, got[row][-1].full, atol=1e-6)
                assert_matches_recomputed(fresh, prompts[row], draft, after[row])
            assert state.texts == [fresh.tokenizer.decode(d) for d in drafts]
            # Rows with holes (row 1 got nothing above) go on decoding correctly.
            more = [d.top[0].id for d in after]
            state.append(more)
            final = state.next()
        for row in range(len(prompts)):
            assert_matches_recomputed(fresh, prompts[row], drafts[row] + [more[row]], final[row])
    finally:
        counter.remove()


def test_appended_tokens_and_an_extend_go_in_one_pass(fresh):
    run = greedy_ids(fresh, PROMPTS[0], 4)
    counter = ForwardCounter(fresh.model)
    try:
        with fresh.open([PROMPTS[0]]) as state:
            counter.reset()
            state.append([run[0]])
            (dists,) = state.extend([run[1:]])
            assert counter.calls == 1 and counter.tokens == 4
    finally:
        counter.remove()
    assert len(dists) == 3
    assert_matches_recomputed(fresh, PROMPTS[0], run, dists[-1])
    assert_matches_recomputed(fresh, PROMPTS[0], run[:2], dists[0])


@pytest.mark.parametrize("rollback", [[2, 2], [1, 3], [0, 4], [5, 1]])
def test_truncate_then_extend_equals_a_fresh_state(fresh, rollback):
    prompts = [PROMPTS[0], PROMPTS[2]]
    runs = [greedy_ids(fresh, p, 5) for p in prompts]
    wrong = fresh.tokenizer(" banana banana", add_special_tokens=False).input_ids
    counter = ForwardCounter(fresh.model)
    try:
        with fresh.open(prompts) as state:
            state.append([r[0] for r in runs])
            state.next()
            state.extend([r[1:] for r in runs])  # the latest feed: 4 tokens per row
            counter.reset()
            state.truncate(rollback)
            kept = [run[: len(run) - n] for run, n in zip(runs, rollback)]
            assert state.texts == [fresh.tokenizer.decode(k) for k in kept]
            after = state.next()
            # Rolled back within the latest feed: no forward; further back: one, one token a row.
            assert counter.calls == (0 if max(rollback) < 5 else 1)
            assert counter.tokens == (0 if max(rollback) < 5 else 1)
            for row in range(2):
                assert_matches_recomputed(fresh, prompts[row], kept[row], after[row])
            redo = state.extend([wrong, wrong[:1]])
        for row, added in enumerate([wrong, wrong[:1]]):
            reference = fresh.open([prompts[row]])
            expected = reference.extend([kept[row] + added])[0][len(kept[row]):]
            for g, e in zip(redo[row], expected):
                np.testing.assert_allclose(g.full, e.full, atol=TOLERANCE)
            assert_matches_recomputed(fresh, prompts[row], kept[row] + added, redo[row][-1])
    finally:
        counter.remove()


def test_truncate_gives_back_cache_columns_and_pending_tokens(fresh):
    run = greedy_ids(fresh, PROMPTS[1], 6)
    state = fresh.open([PROMPTS[1], PROMPTS[1]])
    prompt_width = state._batch.mask.shape[-1]
    state.extend([run, run])
    state.truncate(3)  # the same count on every row: the cache really shrinks
    assert state._batch.mask.shape[-1] == prompt_width + 3
    state.truncate([1, 0])  # one row only: a masked hole, the cache keeps its columns
    assert state._batch.mask.shape[-1] == prompt_width + 3
    state.truncate([0, 1])  # now neither row uses the last column
    assert state._batch.mask.shape[-1] == prompt_width + 2
    state.append([run[2], run[2]])
    state.truncate(1)  # a pending token is simply dropped
    assert state.texts == [fresh.tokenizer.decode(run[:2])] * 2
    with pytest.raises(ValueError, match="row 0 has 2 appended tokens"):
        state.truncate(3)
    with pytest.raises(ValueError, match="1 counts for 2 rows"):
        state.truncate([1])
    state.truncate(2)
    assert state.texts == ["", ""]
    for dist in state.next():
        assert_matches_recomputed(fresh, PROMPTS[1], [], dist)


def test_sliding_window_rows_roll_back_within_the_window_and_refuse_past_it(windowed):
    prompt = PROMPTS[0]  # 5 tokens
    run = greedy_ids(windowed, prompt, 12)
    with windowed.open([prompt, prompt]) as state:
        state.extend([run[:4], run[:2]])  # ragged, 9 columns: below the window
        state.truncate([1, 0])
        for row, kept in enumerate([run[:3], run[:2]]):
            assert_matches_recomputed(windowed, prompt, kept, state.next()[row])
        with pytest.raises(ModelError, match="sliding window of 12"):
            state.extend([run[3:6], run[2:3]])  # different lengths reaching the window
        assert state.texts == [windowed.tokenizer.decode(run[:3]), windowed.tokenizer.decode(run[:2])]
        state.truncate([1, 0])
        state.extend([run[2:8], run[2:8]])  # alike: exact past the window
        for dist in state.next():
            assert_matches_recomputed(windowed, prompt, run[:8], dist)
        with pytest.raises(ModelError, match="cannot be rolled back"):
            state.truncate(1)


def test_a_closed_state_refuses_use(fresh):
    with fresh.open([PROMPTS[0]]) as state:
        state.next()
    for use in (state.next, lambda: state.append([1]), lambda: state.extend([[1]]),
                lambda: state.truncate(0), lambda: state.reorder([0])):
        with pytest.raises(ValueError, match="closed"):
            use()
    state.close()  # closing twice is harmless


def test_vocabulary_and_end_of_text(tiny_base, tiny_guide, tiny_bpe):
    assert tiny_base.vocabulary == tiny_guide.vocabulary != tiny_bpe.vocabulary
    assert str(len(tiny_base.tokenizer)) in tiny_base.vocabulary
    eos = tiny_base.tokenizer.eos_token_id
    assert eos in tiny_base.end_ids and tiny_base.tokenizer.eos_token in tiny_base.end_texts
    assert tiny_base.is_end(Token("", 0.0, eos)) and not tiny_base.is_end(Token("a", 0.0, eos + 1))


# -- prefix reuse -------------------------------------------------------------------------


def test_prefix_reuse_gives_same_text_with_fewer_forward_tokens(tiny_base):
    reusing = LocalModel(tiny_base.model, tiny_base.tokenizer, name="reuse", reuse_prefix=True)
    plain = LocalModel(tiny_base.model, tiny_base.tokenizer, name="plain", reuse_prefix=False)
    counter = ForwardCounter(tiny_base.model)
    try:
        seen = {}
        for model in (reusing, plain):
            counter.reset()
            texts = []
            text = "Answer the question by walking through the reasoning steps.\nQuestion: 2+2?\n"
            for round_ in range(6):
                # Nudging's pattern: a streamed look at the next token (closed at once), then
                # a completion of the same text, then the text grows by a few words.
                with closing(model.stream(text, max_tokens=16)) as stream:
                    peek = next(stream)
                (c,) = model.complete([text], max_tokens=5)
                assert c.steps[0].token.id == peek.token.id
                texts.append(c.text)
                text += c.text + (" and" if round_ % 2 else "")
            seen[model.name] = (texts, counter.tokens)
    finally:
        counter.remove()
    assert seen["reuse"][0] == seen["plain"][0]
    assert seen["reuse"][1] < seen["plain"][1] / 2


def test_prefix_reuse_after_a_closed_stream(tiny_base):
    """A stream closed early leaves its cache for the next prompt that extends it."""
    model = LocalModel(tiny_base.model, tiny_base.tokenizer, name="reuse", reuse_prefix=True)
    text = "Answer the question by walking through the reasoning steps.\nQuestion: 2+2?\n"
    with closing(model.stream(text, max_tokens=16)) as stream:
        steps = [next(stream) for _ in range(4)]
    counter = ForwardCounter(tiny_base.model)
    try:
        more = text + "".join(s.token.text for s in steps)
        (c,) = model.complete([more], max_tokens=1)
    finally:
        counter.remove()
    assert counter.tokens < len(ids_of(model, more)) / 2
    plain = LocalModel(tiny_base.model, tiny_base.tokenizer, name="plain", reuse_prefix=False)
    assert c.steps[0].token.id == plain.complete([more], max_tokens=1)[0].steps[0].token.id


# -- drafts -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drafting(tiny_base) -> LocalModel:
    """tiny_base's weights, drafting by lookup, each call from scratch (no prefix reuse)."""
    return LocalModel(tiny_base.model, tiny_base.tokenizer, name="tiny-drafting", reuse_prefix=False, draft=True)


def assert_same_greedy_run(drafted: list, plain: list) -> None:
    """The same tokens, or the same up to a position where the plain run's two best tokens
    are a near-tie (a pass over several tokens rounds differently from a pass over one)."""
    for a, b in zip(drafted, plain):
        if a.token.id != b.token.id:
            gap = b.top[0].logprob - b.top[1].logprob
            assert gap < TOLERANCE, f"drafted {a.token.text!r}, plain {b.token.text!r}, {gap} nats apart"
            return
        assert a.token.logprob == pytest.approx(b.token.logprob, abs=TOLERANCE)
    assert len(drafted) == len(plain)


def test_drafts_of_the_models_own_text_are_taken_in_few_passes(fresh, tiny_base):
    """Offered its own greedy continuation to look up, the model checks it several tokens a
    pass, and decodes the same tokens."""
    # A model of its own: draft sizes carry over from one call to the next.
    drafting = LocalModel(tiny_base.model, tiny_base.tokenizer, name="tiny-drafting", reuse_prefix=False)
    prompt = ROUND_TRIP_PROMPT
    (plain,) = fresh.complete([prompt], max_tokens=40, top_logprobs=2)
    gen = [s.token.id for s in plain.steps]
    assert ids_of(fresh, prompt + plain.text) == ids_of(fresh, prompt) + gen  # precondition: drafts line up
    # Precondition: no near-tie (0.056 nats at the closest), so rounding cannot part the two runs.
    assert min(s.top[0].logprob - s.top[1].logprob for s in plain.steps) > 10 * TOLERANCE
    counter = ForwardCounter(drafting.model)
    try:
        (drafted,) = drafting.complete([prompt], max_tokens=40, top_logprobs=2, lookup=[prompt + plain.text])
    finally:
        counter.remove()
    assert_same_greedy_run(drafted.steps, plain.steps)
    assert (drafted.text, drafted.finish_reason) == (plain.text, plain.finish_reason)
    assert counter.calls <= 5  # drafts of 8, 10, 12 and 14 tokens, checked with the token before each


@settings(max_examples=20, deadline=None)
@given(prompt=st.lists(st.sampled_from(["one", " two", " three", " four", ",", " one"]), min_size=1, max_size=30),
       lookup=st.lists(st.text(alphabet="abc onetwhrfu,", max_size=40), max_size=2),
       max_tokens=st.integers(1, 30), stream_steps=st.integers(1, 30))
def test_drafted_greedy_decoding_equals_plain(fresh, drafting, prompt, lookup, max_tokens, stream_steps):
    """Whatever the drafts (repeated words in the prompt, arbitrary lookup texts), the tokens
    are plain greedy decoding's, by complete and by a stream read partly."""
    prompt = "".join(prompt)
    (plain,) = fresh.complete([prompt], max_tokens=max_tokens, top_logprobs=2)
    (drafted,) = drafting.complete([prompt], max_tokens=max_tokens, top_logprobs=2, lookup=lookup)
    assert_same_greedy_run(drafted.steps, plain.steps)
    if [s.token.id for s in drafted.steps] == [s.token.id for s in plain.steps]:
        assert (drafted.text, drafted.finish_reason) == (plain.text, plain.finish_reason)
    with closing(drafting.stream(prompt, max_tokens=max_tokens, top_logprobs=2, lookup=lookup)) as stream:
        read = [step for _, step in zip(range(stream_steps), stream)]
    assert_same_greedy_run(read, plain.steps[:stream_steps])


def test_a_closed_drafted_stream_leaves_a_cache_that_continues_exactly(tiny_base, fresh):
    """Drafted tokens a closed stream leaves in the cache are real tokens of it: the next
    prompt reuses what it shares with them."""
    model = LocalModel(tiny_base.model, tiny_base.tokenizer, name="reuse-drafting", reuse_prefix=True, draft=True)
    text = "one two three four, one two three four, one two"
    (plain,) = fresh.complete([text], max_tokens=12, top_logprobs=2)
    with closing(model.stream(text, max_tokens=12, lookup=[text + plain.text])) as stream:
        steps = [next(stream) for _ in range(3)]
    more = text + "".join(s.token.text for s in steps)
    (reused,) = model.complete([more], max_tokens=6, top_logprobs=2)
    (expected,) = fresh.complete([more], max_tokens=6, top_logprobs=2)
    assert_same_greedy_run(reused.steps, expected.steps)


def test_sliding_window_models_draft_only_well_within_the_window(windowed):
    """Rolling back a wrong draft is exact only within the window: a longer run decodes a
    token a pass, and still gives plain greedy decoding's tokens."""
    drafting = LocalModel(windowed.model, windowed.tokenizer, name="tiny-windowed-drafting", reuse_prefix=False)
    prompt = PROMPTS[0]
    counter = ForwardCounter(windowed.model)
    try:
        (long_run,) = drafting.complete([prompt], max_tokens=20, lookup=[prompt + " the the the"])
    finally:
        counter.remove()
    assert counter.calls == 20  # no drafts: the prompt, then one pass a token
    assert [s.token.id for s in long_run.steps] == greedy_ids(windowed, prompt, 20)


# -- answers run together ---------------------------------------------------------------


def complete_then_stream(model: LocalModel, prompt: str) -> list:
    """A completion drafted from the prompt, then a stream from where it ended."""
    (first,) = model.complete([prompt], max_tokens=8, top_logprobs=2, lookup=[prompt])
    with closing(model.stream(prompt + first.text, max_tokens=8, top_logprobs=2)) as stream:
        return first.steps + list(stream)


def test_calls_run_together_decode_as_alone_in_fewer_passes(fresh, tiny_base):
    """Completions and streams of several prompts, run together on a model that reuses its
    prefixes and drafts: the tokens of each alone, in fewer forward passes."""
    prompts = PROMPTS + [PROMPTS[1] + " one two, one two,"]
    expected = [complete_then_stream(fresh, prompt) for prompt in prompts]  # each call from scratch
    passes = {}
    for way in ("together", "alone"):
        counter = ForwardCounter(tiny_base.model)
        try:
            if way == "together":
                model = LocalModel(tiny_base.model, tiny_base.tokenizer, name="tiny-together")
                runs = run_together([functools.partial(complete_then_stream, model, p) for p in prompts])
            else:  # a model each: nothing carries over from another prompt's calls
                runs = [complete_then_stream(LocalModel(tiny_base.model, tiny_base.tokenizer, name="tiny-alone"), p)
                        for p in prompts]
        finally:
            counter.remove()
        passes[way] = counter.calls
        for steps, plain in zip(runs, expected):
            assert_same_greedy_run(steps, plain)
    assert passes["together"] < passes["alone"]


# -- count_tokens -------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "Hello world", " leading space", "naïve 東京 🙂\n\nnew lines",
                                  "<|im_start|>user\nHi<|im_end|>"])
def test_count_tokens(fresh, text):
    assert fresh.count_tokens(text) == len(fresh.tokenizer(text, add_special_tokens=False).input_ids)
