"""One TOWLINE_HOME, several real processes: first uses at once, pulls at once, and real
signals that stop a pull or a conversion half-way. Nothing may be left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from towline.models import registry

pytestmark = pytest.mark.real_models
NAME = "smollm2-135m-instruct"
LOAD = "import sys; from towline.models.local import LocalModel; LocalModel.load(sys.argv[1]); print('loaded')"
WAIT_S = 120  # generous bound for a slow, shared machine; the waits end as soon as they can


SENT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def start(*args: str) -> subprocess.Popen:
    """A Python process that the signals these tests send stop, also where the tests
    themselves run with one ignored (SIGINT in a shell's background job, SIGHUP under
    nohup), which children would inherit."""

    def default_signals() -> None:
        for signum in SENT_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)

    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=default_signals)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def wait_for(find: Callable[[], object], process: subprocess.Popen) -> object:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if found := find():
            return found
        if process.poll() is not None:
            pytest.fail(f"the process ended first: {process.communicate()[1][-2000:]}")
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"nothing found after {WAIT_S} s")


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live child processes of ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # it ended while we looked
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append((int(stat.parent.name), command))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def test_two_first_uses_at_once_convert_once_and_both_load(pulled_home, home_from, leftovers):
    home = home_from(pulled_home)
    # What a process killed with SIGKILL mid-conversion leaves: the next conversion removes it.
    (home / "converted" / f".{registry.converted_dir(NAME).name}.staging-killed").mkdir(parents=True)
    results = [finish(p) for p in [start("-c", LOAD, NAME), start("-c", LOAD, NAME)]]
    for code, out, err in results:
        assert code == 0 and out.strip() == "loaded", err[-3000:]
    assert sum("converting the GGUF file" in err for _, _, err in results) == 1
    assert registry.status(NAME, full=True) == registry.Status(NAME, installed=True, converted=True, problems=())
    assert leftovers(home) == []


def test_two_forced_pulls_at_once_both_succeed(pulled_home, home_from, leftovers):
    home = home_from(pulled_home)
    (home / "models" / NAME / ".pull-killed").mkdir()  # left by a pull killed with SIGKILL
    pull = ("-m", "towline.cli", "models", "pull", NAME, "--force")
    results = [finish(p) for p in [start(*pull), start(*pull)]]
    for code, _, err in results:
        assert code == 0 and "installed and verified" in err, err
    assert registry.status(NAME, full=True).problems == ()
    assert leftovers(home) == []


@pytest.mark.parametrize("signum", SENT_SIGNALS)
def test_a_signal_stops_a_pull_with_its_pip_and_leaves_nothing(signum, tmp_path, monkeypatch, leftovers):
    monkeypatch.setenv("TOWLINE_HOME", str(tmp_path))
    process = start("-m", "towline.cli", "models", "pull", NAME)
    pip = wait_for(lambda: [pid for pid, command in children(process.pid) if " pip " in command], process)[0]
    assert list(tmp_path.glob(f"models/{NAME}/.pull-*"))  # its temporary folder, to be removed
    process.send_signal(signum)
    code, _, err = finish(process)
    assert code != 0, err
    assert not alive(pip)
    assert not registry.gguf_path(NAME).exists()
    assert leftovers(tmp_path) == []


def test_ctrl_c_during_a_first_conversion_removes_its_staging_folder(pulled_home, home_from, leftovers):
    home = home_from(pulled_home)
    process = start("-c", LOAD, NAME)
    wait_for(lambda: list(home.glob("converted/.*.staging-*")), process)
    process.send_signal(signal.SIGINT)
    code, _, err = finish(process)
    assert code != 0 and "KeyboardInterrupt" in err, err
    assert not registry.converted_dir(NAME).exists()
    assert leftovers(home) == []


def test_sigterm_during_a_repair_on_load_removes_its_staging_folder(converted_home, home_from, leftovers):
    home = home_from(converted_home)
    with (registry.converted_dir(NAME) / "tokenizer.json").open("ab") as f:
        f.write(b" ")
    process = start("-c", LOAD, NAME)
    wait_for(lambda: list(home.glob("converted/.*.staging-*")), process)
    process.send_signal(signal.SIGTERM)
    code, _, err = finish(process)
    assert code == 128 + signal.SIGTERM, err
    assert "the converted cache" in err and "is damaged (tokenizer.json has" in err and "converting again" in err
    assert not registry.converted_dir(NAME).exists()  # the damaged copy went first; the new one never came
    assert leftovers(home) == []
