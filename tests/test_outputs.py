"""The output-path rules: only mlic's own outputs are replaced, inputs are never outputs, one writer per folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mlic.outputs import Output, OutputError, check_outputs, lock_folder, unlock_folder, written_by_mlic


def test_only_an_output_of_the_same_kind_is_replaced(tmp_path):
    mine = tmp_path / "preds.csv"
    mine.write_text("path,labels,cat,dog\na.jpg,cat,0.9,0.1\n")
    table = tmp_path / "labels.csv"
    table.write_text("path,labels\na.jpg,cat\n")  # a user's label table: the first two columns match, not ours
    check_outputs([Output("--csv", mine, "predictions-csv")])
    with pytest.raises(OutputError, match=r"--csv .*labels.csv: exists and is not a CSV written by mlic predict.*"
                                          r"--overwrite"):
        check_outputs([Output("--csv", table, "predictions-csv")])
    check_outputs([Output("--csv", table, "predictions-csv")], overwrite=True)
    with pytest.raises(OutputError, match="is not JSON lines written by mlic predict"):
        check_outputs([Output("--jsonl", mine, "predictions-jsonl")])  # ours, but another kind
    with pytest.raises(OutputError, match="is a folder"):
        check_outputs([Output("--csv", tmp_path, "predictions-csv")], overwrite=True)
    assert not written_by_mlic(tmp_path / "missing.csv", "predictions-csv")


def test_an_input_is_never_an_output_even_with_overwrite(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"\xff\xd8 not really")
    (tmp_path / "sub").mkdir()
    for spelling in (image, tmp_path / "sub" / ".." / "a.jpg"):
        with pytest.raises(OutputError, match="is an input of this command"):
            check_outputs([Output("--csv", spelling, "predictions-csv")], inputs=[image], overwrite=True)
    link = tmp_path / "link.csv"
    link.symlink_to(image)
    with pytest.raises(OutputError, match="is an input of this command"):
        check_outputs([Output("--csv", link, "predictions-csv")], inputs=[image], overwrite=True)


def test_two_outputs_never_share_a_path(tmp_path):
    with pytest.raises(OutputError, match="--jsonl and --csv name the same file"):
        check_outputs([Output("--jsonl", tmp_path / "x", "predictions-jsonl"),
                       Output("--csv", tmp_path / "." / "x", "predictions-csv")])


HOLD = "import sys, time; from mlic.outputs import lock_folder; lock_folder(sys.argv[1]); print('held', flush=True); " \
       "time.sleep(60)"


def test_a_folder_has_one_writer_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=rf"{folder}: --out is being written by pid {holder.pid} "):
            lock_folder(folder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_folder(folder)  # the kernel dropped the killed process's lock
    lock_folder(folder)  # the same process again: a no-op
    unlock_folder(folder)
    assert (folder / ".mlic.lock").is_file() and os.listdir(folder) == [".mlic.lock"]


def test_two_trainings_into_one_folder_at_once_one_is_refused(tmp_path):
    """Two `mlic train --out X` started together: exactly one trains, the other names the running process."""
    env = {**os.environ, "MLIC_CACHE": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "mlic", "train", "--digits-size", "32,16,16", "--img-size", "32", "--epochs", "2",
            "--batch-size", "16", "--workers", "0", "--quiet", "--out", str(tmp_path / "run")]
    subprocess.run(args[:3] + ["--help"], env=env, capture_output=True)  # warm the import cache
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    second = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [(p.wait(timeout=300), *p.communicate()) for p in (first, second)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert "is being written by pid" in refused or "holds a run already" in refused, refused
    assert "Traceback" not in refused
