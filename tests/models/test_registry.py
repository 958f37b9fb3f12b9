"""The registry of offline models: real downloads from PyPI into throw-away homes, damage
found and repaired, caches that survive a copied home."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from towline.models import registry
from towline.models.base import ModelError
from towline.models.local import LocalModel

pytestmark = pytest.mark.real_models
NAME = "smollm2-135m-instruct"  # the smallest registry model (98 MB)


def flip_bytes(path, *, keep_time: bool = False) -> None:
    """Overwrite 64 bytes in the middle of a file: same size, other content."""
    before = path.stat()
    with path.open("r+b") as f:
        f.seek(before.st_size // 2)
        inverted = bytes(b ^ 0xFF for b in f.read(64))
        f.seek(before.st_size // 2)
        f.write(inverted)
    if keep_time:  # as bit rot does: only a full hash can tell
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_every_entry_is_consistent():
    for entry in registry.REGISTRY.values():
        assert entry.kind in ("base", "instruct")
        assert len(entry.sha256) == 64 and entry.size_bytes > 0 and entry.parts
        assert len({p.member for p in entry.parts}) == len(entry.parts)
    vocabularies = {e.name: e.vocabulary for e in registry.REGISTRY.values()}
    assert vocabularies["qwen2.5-coder-0.5b-instruct"] == vocabularies["qwen2.5-coder-1.5b-instruct"]


def test_unknown_name_lists_the_known_ones_and_the_closest():
    with pytest.raises(ModelError, match="known models: gemma-3-270m"):
        registry.entry("gpt-5")
    with pytest.raises(ModelError, match="Did you mean qwen2.5-coder-0.5b-instruct"):
        registry.entry("qwen2.5-coder-0.5b")


def test_pull_verifies_and_repairs_the_gguf(tmp_path, monkeypatch, leftovers):
    monkeypatch.setenv("TOWLINE_HOME", str(tmp_path))
    messages: list[str] = []
    path = registry.pull(NAME, log=messages.append)
    assert registry.sha256_of(path) == registry.entry(NAME).sha256
    assert registry.gguf_file(NAME) == path
    assert registry.status(NAME) == registry.Status(NAME, installed=True, converted=False, problems=())

    registry.pull(NAME, log=messages.append)
    assert "already installed" in messages[-1]

    flip_bytes(path)  # its modification time changes: the cheap check hashes it
    assert "SHA-256 mismatch" in registry.status(NAME).problems[0]
    with pytest.raises(ModelError, match=f"damaged.*towline models pull {NAME}"):
        registry.local_weights(NAME)
    messages.clear()
    registry.pull(NAME, log=messages.append)
    assert "downloading it again" in messages[0]
    assert registry.sha256_of(path) == registry.entry(NAME).sha256
    assert registry.status(NAME, full=True).problems == ()
    assert leftovers(tmp_path) == []


def test_truncated_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("TOWLINE_HOME", str(tmp_path))
    path = registry.gguf_path(NAME)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=f"4 bytes.*run `towline models pull {NAME}`"):
        registry.gguf_file(NAME)
    assert "4 bytes" in registry.status(NAME).problems[0]


def test_damaged_cache_is_listed_verified_and_repaired_by_plain_pull(converted_home, home_from, towline):
    home = home_from(converted_home)
    folder = registry.converted_dir(NAME)
    # Caches of this model from before: under another key, and a path-keyed one (older towline).
    old = home / "converted" / f"{NAME}-0123456789abcdef"
    shutil.copytree(folder, old)
    legacy = home / "converted" / "SmolLM2-135M-Instruct.Q4_1-00000000deadbeef"
    legacy.mkdir()
    (legacy / registry.MARKER).write_text(json.dumps({"source": str(registry.gguf_path(NAME))}))
    weights = folder / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)

    listing = towline("models")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if NAME in line)
    assert "damaged" in row and "yes" not in row
    assert f"{NAME} is damaged (converted cache" in listing.stdout
    assert f"run `towline models pull {NAME}` to repair it" in listing.stdout

    verify = towline("models", "verify", NAME)
    assert verify.returncode == 1
    assert "model.safetensors has" in verify.stdout and f"towline models pull {NAME}" in verify.stdout

    repair = towline("models", "pull", NAME)
    assert repair.returncode == 0, repair.stderr
    assert "SHA-256 verified" in repair.stderr and "repaired the converted cache" in repair.stderr
    assert not old.exists() and not legacy.exists()

    verify = towline("models", "verify")
    assert verify.returncode == 0, verify.stdout
    assert f"{NAME}: ok (GGUF file and converted cache verified)" in verify.stdout
    assert "gemma-3-270m: not installed" in verify.stdout
    row = next(line for line in towline("models").stdout.splitlines() if NAME in line)
    assert "yes" in row and "damaged" not in row
    assert not list(home.rglob(".*.staging-*"))


def test_the_cheap_check_sees_touched_files_and_verify_sees_every_byte(converted_home, home_from):
    home_from(converted_home)
    folder = registry.converted_dir(NAME)
    flip_bytes(folder / "model.safetensors", keep_time=True)
    assert registry.status(NAME).problems == ()  # the cheap check trusts an unchanged time...
    assert "model.safetensors has other content" in registry.status(NAME, full=True).problems[0]  # ...verify does not

    flip_bytes(folder / "tokenizer.json")
    assert "tokenizer.json has other content" in registry.status(NAME).problems[0]


def test_a_cache_that_passes_the_cheap_check_but_does_not_load_says_how_to_repair(converted_home, home_from):
    home_from(converted_home)
    weights = registry.converted_dir(NAME) / "model.safetensors"
    before = weights.stat()
    with weights.open("r+b") as f:
        f.write(b"\xff" * 8)  # the header's length: unreadable
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # as bit rot: same size and time
    with pytest.raises(ModelError, match=f"does not load.*run `towline models pull {NAME}` to repair it"):
        LocalModel.load(NAME)


def test_a_copied_home_keeps_its_conversion(converted_home, tmp_path, monkeypatch):
    home = tmp_path / "copied"
    shutil.copytree(converted_home, home, copy_function=shutil.copyfile)  # as `cp -r`: new times
    monkeypatch.setenv("TOWLINE_HOME", str(home))
    messages: list[str] = []
    folder = registry.local_weights(NAME, log=messages.append)
    assert folder.is_relative_to(home) and messages == []  # reused, not converted again
    marker = json.loads((folder / registry.MARKER).read_text())
    for name, record in marker["files"].items():  # hashed once, times recorded anew
        assert record["mtime_ns"] == (folder / name).stat().st_mtime_ns


def test_other_gguf_files_are_keyed_by_content(pulled_home, tmp_path, monkeypatch):
    monkeypatch.setenv("TOWLINE_HOME", str(tmp_path / "home"))
    gguf = pulled_home / "models" / NAME / registry.entry(NAME).gguf_name
    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for copy in (first, second):
        copy.parent.mkdir()
        shutil.copyfile(gguf, copy)
    key = registry.file_converted_dir(first)
    assert key == registry.file_converted_dir(second) and str(tmp_path) not in key.name
    flip_bytes(second)
    assert registry.file_converted_dir(second) != key
