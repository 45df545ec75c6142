"""The run folder's lock: one writer at a time, and nothing left beside the run afterwards."""

import os

import pytest

from fastcxr.runtime.runs import RunError, RunLock


def test_the_lock_file_is_removed_when_the_run_ends(tmp_path):
    run = tmp_path / "r"
    with RunLock(run) as lock:
        assert lock.path == tmp_path / ".r.lock" and lock.path.exists()
        with pytest.raises(RunError, match=rf"pid {os.getpid()}"):
            RunLock(run).__enter__()  # a second writer is refused, naming the holder
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with RunLock(run):  # and the folder can be locked again
        pass


def test_a_lock_taken_on_a_file_just_removed_is_taken_anew(tmp_path, monkeypatch):
    """A second process opened the lock file just before its holder removed it: its lock on
    the removed file would be no lock at all (a third process could lock a new file at the
    same path), so it must notice and lock the file the path names now."""
    run = tmp_path / "r"
    first = RunLock(run).__enter__()
    stale = os.open(first.path, os.O_RDWR)  # the second process's open, before the removal
    first.__exit__(None, None, None)
    assert not first.path.exists()
    real_open, opened = os.open, []

    def open_(path, flags, mode=0o777):
        opened.append(path)
        return stale if len(opened) == 1 else real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", open_)
    with RunLock(run) as second:
        assert len(opened) == 2  # the stale file was locked, seen removed, and let go
        st, own = os.stat(second.path), os.fstat(second.fd)
        assert (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
    assert not second.path.exists()


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_is_killed(tmp_path):
    """#22 item 19: a SIGKILLed trainer's orphaned loader workers held its lock for seconds,
    so an immediate --resume was refused naming the dead pid."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "r"
    code = (
        "import os, sys, time\n"
        "from fastcxr.runtime.runs import RunLock\n"
        f"lock = RunLock({str(run)!r}).__enter__()\n"
        "if os.fork() == 0:\n"  # a worker that outlives its parent
        "    time.sleep(30); os._exit(0)\n"
        "print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.2)
    with RunLock(run):  # at once, while the orphan still sleeps
        pass
