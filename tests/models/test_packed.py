"""Tests for towline.models.packed: linear layers packed for oneDNN compute what stock ones do."""

from __future__ import annotations

import copy

import pytest
import torch

from towline.models import packed
from towline.models.local import LocalModel
from towline.models.packed import PackedLinear, pack_linear_layers

pytestmark = pytest.mark.skipif(not packed.available(), reason="this PyTorch build cannot pack linear layers")


def packed_count(model: torch.nn.Module) -> int:
    return sum(isinstance(m, PackedLinear) for m in model.modules())


def test_a_packed_model_computes_what_the_stock_one_does(tiny_base, smollm2_tokenizer):
    stock = tiny_base.model
    fast = copy.deepcopy(stock)
    assert pack_linear_layers(fast) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the output layer
    ids = torch.tensor([smollm2_tokenizer("Question: What is 2+2?\nAnswer: it is").input_ids])
    with torch.inference_mode():
        want, got = stock(input_ids=ids).logits, fast(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    # Decoding with a cache and drafts (passes of several tokens, rolled back) takes the
    # same greedy tokens, where no two best tokens are nearly tied.
    prompt = "The capital of France is"
    texts = [LocalModel(model, smollm2_tokenizer, name="tiny").complete(
        [prompt], max_tokens=12, top_logprobs=2, lookup=[prompt])[0] for model in (stock, fast)]
    assert min(s.top[0].logprob - s.top[1].logprob for s in texts[0].steps) > 0.1  # rounding moves ~1e-3
    assert [s.token.id for s in texts[1].steps] == [s.token.id for s in texts[0].steps]


@pytest.mark.parametrize("shape", [(0,), (1,), (2,), (3,), (4,), (6,), (1, 1), (1, 3), (2, 1), (2, 3, 2)])
def test_few_rows_are_padded_and_come_back_in_their_shape(shape):
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(*shape, 16)
    got = PackedLinear.of(layer)(x)
    assert got.shape == (*shape, 8)
    assert torch.allclose(got, layer(x), atol=1e-5)


def test_only_float32_linear_layers_of_their_own_type_are_packed():
    class Custom(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8).to(torch.bfloat16), Custom(8, 8),
                                torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False)))
    assert pack_linear_layers(model) == 2
    assert [type(m).__name__ for m in model.modules()][1:] == [
        "PackedLinear", "Linear", "Custom", "Sequential", "PackedLinear"]
    assert model[3][0].bias is None


def test_a_packed_model_copies_and_its_copy_computes_alike():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    pack_linear_layers(model)
    twin = copy.deepcopy(model)
    x = torch.randn(3, 8)
    assert torch.equal(twin(x), model(x))


def test_load_packs_unless_asked_not_to(tiny_base, tmp_path):
    tiny_base.model.save_pretrained(tmp_path)
    tiny_base.tokenizer.save_pretrained(tmp_path)
    assert packed_count(LocalModel.load(str(tmp_path)).model) == 15
    assert packed_count(LocalModel.load(str(tmp_path), pack=False).model) == 0
