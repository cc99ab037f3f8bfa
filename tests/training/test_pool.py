import os
import stat
import sys
import time

import pytest

from recblr_torchrec.errors import ConfigError
from recblr_torchrec.training.pool import MPS_CONTROL, Run, run_pool

# Stands in for NVIDIA's control program: records each call's arguments, input and pipe folder.
FAKE_CONTROL = """#!/bin/sh
input=""
[ "$1" = "-d" ] || input=$(cat)
echo "args=$* input=$input pipe=$CUDA_MPS_PIPE_DIRECTORY" >> "{record}"
{failure}
"""


def fake_control(tmp_path, monkeypatch, failure=""):
    folder = tmp_path / "bin"
    folder.mkdir()
    record = tmp_path / "calls.txt"
    control = folder / MPS_CONTROL
    control.write_text(FAKE_CONTROL.format(record=record, failure=failure))
    control.chmod(control.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return record


def env_dump_runs(tmp_path, count):
    code = "import os, sys; open(sys.argv[1], 'w').write(os.environ.get('CUDA_MPS_PIPE_DIRECTORY', 'none'))"
    return [
        Run(f"r{i}", str(tmp_path / f"r{i}"), [sys.executable, "-c", code, str(tmp_path / f"r{i}.env")])
        for i in range(count)
    ]


def test_with_mps_every_run_is_a_client_of_the_pools_own_daemon_which_is_quit_after(tmp_path, monkeypatch):
    record = fake_control(tmp_path, monkeypatch)
    failed, finished = run_pool(env_dump_runs(tmp_path, 3), 2, time.monotonic() + 600, str(tmp_path), mps=True)
    assert failed == [] and finished
    start, end = record.read_text().splitlines()
    pipe = start.split("pipe=")[1]
    assert start.startswith("args=-d input= ") and pipe.endswith("pipe")
    assert end == f"args= input=quit pipe={pipe}"
    assert {(tmp_path / f"r{i}.env").read_text() for i in range(3)} == {pipe}
    assert not os.path.exists(os.path.dirname(pipe))  # the daemon's folders go with it
    # without --mps the runs are no clients
    assert run_pool(env_dump_runs(tmp_path, 1), 1, time.monotonic() + 600, str(tmp_path)) == ([], True)
    assert (tmp_path / "r0.env").read_text() == "none"


def test_mps_without_the_control_program_or_with_one_that_fails_says_how_to_go_on(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match=f"--mps needs {MPS_CONTROL}.*leave --mps off"):
        run_pool(env_dump_runs(tmp_path, 1), 1, time.monotonic() + 600, str(tmp_path), mps=True)
    monkeypatch.setenv("PATH", os.defpath)
    fake_control(tmp_path, monkeypatch, failure='echo "An instance of this daemon is already running"; exit 1')
    with pytest.raises(RuntimeError, match="exited with 1 .An instance of this daemon is already running.*--mps off"):
        run_pool(env_dump_runs(tmp_path, 1), 1, time.monotonic() + 600, str(tmp_path), mps=True)
    assert not (tmp_path / "r0.env").exists()  # no run started


def test_a_failed_run_starts_again_up_to_retries_times_and_only_its_last_exit_is_reported(tmp_path, capsys):
    # "flaky" fails once (as a run whose GPU another MPS client faulted), "broken" every time
    code = (
        "import os, sys; m = sys.argv[1]; once = os.path.exists(m); open(m, 'a').write('x'); sys.exit(0 if once else 3)"
    )
    flaky = Run("flaky", str(tmp_path / "flaky"), [sys.executable, "-c", code, str(tmp_path / "flaky.marks")])
    broken = Run("broken", str(tmp_path / "broken"), [sys.executable, "-c", "import sys; sys.exit(4)"])
    exits = []
    failed, finished = run_pool(
        [flaky, broken],
        2,
        time.monotonic() + 600,
        str(tmp_path),
        on_exit=lambda run, code: exits.append((run.name, code)),
    )
    assert failed == ["broken"] and finished
    assert sorted(exits) == [("broken", 4), ("flaky", 0)]  # on_exit hears each run's last exit only
    assert (tmp_path / "flaky.marks").read_text() == "xx"
    said = capsys.readouterr().out
    assert "[flaky] exited with 3; it starts again from its last checkpoint (retry 1 of 1" in said
    assert said.count("[broken] exited with 4") == 2
    # retries=0: the first failure stands
    (tmp_path / "flaky.marks").unlink()
    assert run_pool([flaky], 1, time.monotonic() + 600, str(tmp_path), retries=0) == (["flaky"], True)
    with pytest.raises(ConfigError, match="retries=-1"):
        run_pool([flaky], 1, time.monotonic() + 600, str(tmp_path), retries=-1)
