"""`tinystories train` under faults and mistakes (issue 13 items 6, 7, 9, the stop status; issue 15).

Each ends with one line on stderr and a documented exit status, never a traceback, and leaves what
was on disk as it was: a damaged run config.json, a full disk while a checkpoint is written (a file
size limit stands in for it), a run folder left by a crash before its first checkpoint, a stop
request, and under torchrun a rank that fails or is stopped while the other is fine.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from test_train import SMALL, read_log, torchrun_cmd, torchrun_train, weights
from tinystories.errors import EXIT_STOPPED
from tinystories.runlock import LOCK_FILE


def one_line_error(r, code=2):
    """The CLI promise: exit `code`, exactly one line on stderr, no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes, to prove a failed command changed nothing. The run
    lock's file is left out: every command that trains there takes the lock and writes its pid."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def file_size_limit(n_bytes):
    """preexec_fn: no file may grow past n_bytes (`ulimit -f`, a full disk's stand-in). SIGXFSZ is
    ignored, as a full disk sends none, so the write fails with EFBIG instead of killing the process."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return limit


@pytest.fixture
def trained(tmp_path, small_data):
    """A run of 4 steps with checkpoints/last at step 4."""
    run = tmp_path / "run"
    run_cli("train", "--data", small_data, "--out", run, *SMALL, "--max-steps", 4, "--checkpoint-interval", 4,
            "--dtype", "fp32", check=True)
    return run


# -----------------------------------------------------------------------------
# 6. A damaged run config.json on --resume


@pytest.mark.parametrize("damage", [
    b'{"preset": "tiny", "model": {"n_layer"',  # cut off mid-write
    b"",  # emptied
    b"\xff\xfe not text",  # not UTF-8
    b'["a", "list"]',  # JSON, but not the run's object
    b'{"preset": "tiny"}',  # an object without the settings
    b'{"preset": "tiny", "model": {}, "train": {}, "data": []}',  # settings of the wrong type
])
def test_a_damaged_run_config_is_one_line_and_changes_nothing(trained, small_data, damage):
    (trained / "config.json").write_bytes(damage)
    before = snapshot(trained)
    r = run_cli("train", "--data", small_data, "--out", trained, "--resume", "--max-steps", 6)
    line = one_line_error(r)
    assert "config.json" in line and "--init-from" in line  # says which file and the way on
    assert snapshot(trained) == before


def test_a_missing_run_config_is_one_line(trained, small_data):
    (trained / "config.json").unlink()
    before = snapshot(trained)
    line = one_line_error(run_cli("train", "--data", small_data, "--out", trained, "--resume", "--max-steps", 6))
    assert "config.json does not exist" in line
    assert snapshot(trained) == before


# -----------------------------------------------------------------------------
# 7. A write that fails while saving a checkpoint


@pytest.mark.parametrize("part", ["model.safetensors", "trainer_state.pt"])
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(trained, small_data, part):
    last = trained / "checkpoints" / "last"
    before = snapshot(last)
    size = {name: len(data) for name, data in before.items()}
    # A limit the files written before `part` fit under and `part` does not.
    if part == "model.safetensors":
        limit = size["model.safetensors"] // 2
    else:
        assert size["trainer_state.pt"] > size["model.safetensors"] + 10_000
        limit = size["model.safetensors"] + 5_000
    r = run_cli("train", "--data", small_data, "--out", trained, "--resume", "--max-steps", 8,
                "--checkpoint-interval", 1, preexec_fn=file_size_limit(limit))
    line = one_line_error(r)
    assert "could not write checkpoint" in line and part in line and "intact" in line, line
    assert snapshot(last) == before  # the previous checkpoints/last, byte for byte
    assert not list(last.parent.glob(".*tmp*"))  # and no half-written folder beside it

    r = run_cli("train", "--data", small_data, "--out", trained, "--resume", "--max-steps", 8)  # room again
    assert r.returncode == 0, r.stderr
    assert [rec["step"] for rec in read_log(trained)] == list(range(1, 9))


def test_a_full_disk_at_the_first_checkpoint_says_there_was_none(tmp_path, small_data):
    run = tmp_path / "run"
    r = run_cli("train", "--data", small_data, "--out", run, *SMALL, "--max-steps", 4, "--checkpoint-interval", 2,
                preexec_fn=file_size_limit(50_000))
    line = one_line_error(r)
    assert "could not write checkpoint" in line and "no earlier checkpoint" in line, line
    assert not (run / "checkpoints" / "last").exists()
    # what is left cannot be resumed; the next command names the way out
    line = one_line_error(run_cli("train", "--data", small_data, "--out", run, "--resume"))
    assert "delete" in line and "first checkpoint" in line


# -----------------------------------------------------------------------------
# 9. A run folder left by a crash before its first checkpoint


def _crashed_before_first_step(run: Path, config: bytes, extra: str) -> None:
    """What a crash between writing config.json and logging step 1 leaves."""
    run.mkdir()
    (run / "config.json").write_bytes(config)
    if "log" in extra:
        (run / "log.jsonl").write_text("")
    if "tmp" in extra:  # a first save killed before its rename
        (run / "checkpoints" / ".last.tmp-12345").mkdir(parents=True)
        (run / "checkpoints" / ".last.tmp-12345" / "model.safetensors").write_bytes(b"\0" * 100)


@pytest.mark.parametrize("extra", ["config only", "empty log", "empty log and a killed save tmp"])
def test_a_folder_left_before_the_first_step_is_reused(trained, tmp_path, small_data, extra):
    run = tmp_path / "crashed"
    _crashed_before_first_step(run, (trained / "config.json").read_bytes(), extra)
    # --resume has nothing to continue, and says to drop it
    line = one_line_error(run_cli("train", "--data", small_data, "--out", run, "--resume"))
    assert "drop --resume" in line
    # without --resume, a new run starts there
    r = run_cli("train", "--data", small_data, "--out", run, *SMALL, "--max-steps", 2)
    assert r.returncode == 0, r.stderr
    assert [rec["step"] for rec in read_log(run)] == [1, 2]
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 2
    assert not list((run / "checkpoints").glob(".*tmp*"))


def test_a_folder_with_logged_steps_but_no_checkpoint_names_the_way_out(tmp_path, small_data):
    run = tmp_path / "run"
    # killed at once (SIGKILL) after step 2, before the first checkpoint (step 1000) and evaluation
    args = [*SMALL, "--max-steps", 1000, "--checkpoint-interval", 1000, "--eval-interval", 1000]
    proc = subprocess.Popen([sys.executable, "-m", "tinystories", "train", "--data", str(small_data), "--out", str(run),
                             *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "log.jsonl").exists() and len(read_log(run)) >= 2):
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=60)
    assert not (run / "checkpoints").exists() and len(read_log(run)) >= 2
    before = snapshot(run)
    for resume in (["--resume"], []):
        line = one_line_error(run_cli("train", "--data", small_data, "--out", run, *resume, *SMALL, "--max-steps", 4))
        assert "stopped before" in line and "first checkpoint" in line and f"delete {run}" in line, line
    assert snapshot(run) == before  # the logged steps are not thrown away silently


# -----------------------------------------------------------------------------
# The exit status of a stopped run (the resume tests in test_train.py check it on SIGINT and SIGTERM)


def test_stopped_is_documented_in_help():
    r = run_cli("train", "--help")
    assert f"{EXIT_STOPPED}   stopped by Ctrl-C or SIGTERM" in r.stdout
    assert f"exits with status {EXIT_STOPPED}" in (REPO / "README.md").read_text().replace("\n", " ")


def test_the_demo_says_a_stopped_run_was_stopped(monkeypatch):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import demo
    finally:
        sys.path.remove(str(REPO / "scripts"))
    for code, needle in [(EXIT_STOPPED, "stopped during `tinystories train`"), (2, "failed (exit 2)")]:
        monkeypatch.setattr(demo, "tinystories", lambda argv, code=code: code)
        with pytest.raises(SystemExit) as e:
            demo.call("train", "--data", "x")
        assert needle in str(e.value)
    monkeypatch.setattr(demo, "tinystories", lambda argv: 0)
    demo.call("train", "--data", "x")  # a finished step goes on


# -----------------------------------------------------------------------------
# torchrun: one rank fails or is stopped (issue 15)


def rank_logs(log_dir: Path, stream: str) -> dict[int, str]:
    """What each rank wrote to `stream` under torchrun --log-dir ... --redirects 3."""
    files = sorted(log_dir.glob(f"*/attempt_0/*/{stream}.log"))
    return {int(f.parent.name): f.read_text() for f in files}


def _rank_pids(torchrun: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (their RANK from /proc/PID/environ)."""
    children = Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children")
    pids = [int(p) for p in children.read_text().split()] if children.exists() else []
    ranks = {}
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        ranks[int(env[b"RANK"])] = pid
    return ranks


def _start_long_ddp_run(run: Path, logs: Path, data: Path) -> tuple[subprocess.Popen, dict[int, int]]:
    """A 2-rank run that would go on for hours, once it has logged 3 steps: (torchrun, {rank: pid})."""
    args = [*SMALL, "--max-steps", 100000, "--checkpoint-interval", 100000, "--grad-accum", 2]
    proc = subprocess.Popen(torchrun_cmd("--data", data, "--out", run, *args, log_dir=logs),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "log.jsonl").exists() and len(read_log(run)) >= 3):
        time.sleep(0.05)
    ranks = _rank_pids(proc)
    assert sorted(ranks) == [0, 1], ranks
    return proc, ranks


@pytest.mark.slow
def test_ddp_a_rank_that_cannot_save_stops_every_rank_with_one_line(tmp_path, small_data):
    """Only rank 0 writes checkpoints, so a full disk fails there alone: every rank must stop with
    one line and exit 2, not hang in the next step's all-reduce or abort, and --resume must work."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    args = [*SMALL, "--checkpoint-interval", 2, "--eval-interval", 1000, "--grad-accum", 2]
    torchrun_train("--data", small_data, "--out", run, *args, "--max-steps", 2)  # checkpoints/last at step 2
    before = snapshot(run / "checkpoints" / "last")
    limit = len(before["model.safetensors"]) // 2
    r = subprocess.run(torchrun_cmd("--data", small_data, "--out", run, "--resume", "--max-steps", 4, log_dir=logs),
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       preexec_fn=file_size_limit(limit))
    assert r.returncode == 1  # torchrun's own status when a rank exits non-zero
    assert "exitcode  : -" not in r.stderr and "SIGABRT" not in r.stderr, r.stderr[-3000:]  # no abort, no kill
    err = rank_logs(logs, "stderr")
    assert sorted(err) == [0, 1], r.stderr[-3000:]
    for rank, text in err.items():
        lines = text.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tinystories train: error:"), (rank, text)
    assert "could not write checkpoint" in err[0] and "intact" in err[0]
    assert "stopping with rank 0, which could not write" in err[1]
    assert snapshot(run / "checkpoints" / "last") == before

    torchrun_train("--data", small_data, "--out", run, "--resume", "--max-steps", 4)
    assert [rec["step"] for rec in read_log(run)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_ddp_a_stop_request_to_one_rank_stops_all_at_the_same_step(tmp_path, small_data):
    """SIGTERM to rank 1 alone (a scheduler preempting one worker): both ranks finish the same step,
    rank 0 saves checkpoints/last, every rank exits with the stopped status, and --resume goes on."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    proc, ranks = _start_long_ddp_run(run, logs, small_data)
    os.kill(ranks[1], signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "exitcode  : -" not in err and "SIGABRT" not in err, err[-3000:]
    assert err.count(f"exitcode  : {EXIT_STOPPED}") + err.count(f"(exitcode: {EXIT_STOPPED})") >= 1, err[-3000:]
    stdout = rank_logs(logs, "stdout")
    assert "stopped at step" in stdout[0] and "--resume" in stdout[0], stdout
    assert "Traceback" not in "".join(rank_logs(logs, "stderr").values())
    stopped_at = json.loads((run / "checkpoints" / "last" / "config.json").read_text())["step"]
    assert read_log(run)[-1]["step"] == stopped_at  # every logged step is in the checkpoint

    torchrun_train("--data", small_data, "--out", run, "--resume", "--max-steps", stopped_at + 1)
    assert read_log(run)[-1]["step"] == stopped_at + 1
    assert weights(run)  # loads


@pytest.mark.slow
def test_ddp_a_rank_killed_at_once_makes_the_other_stop_with_one_line(tmp_path, small_data):
    """SIGKILL to rank 1 (the OOM killer, say): rank 0 must not hang in its next all-reduce (Gloo's
    timeout is 30 minutes) nor end in a traceback or an abort, but stop with one line that says why."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    proc, ranks = _start_long_ddp_run(run, logs, small_data)
    os.kill(ranks[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert "SIGABRT" not in err and "exitcode  : -6" not in err, err[-3000:]
    rank_0 = rank_logs(logs, "stderr")[0]
    assert "Traceback" not in rank_0 and "lost contact with another process" in rank_0.strip().splitlines()[-1], rank_0
