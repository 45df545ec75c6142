"""The run folder's lock: one writer at a time, and nothing left beside the run afterwards."""

import os

import pytest

from fastcxr.runs import RunError, RunLock


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
