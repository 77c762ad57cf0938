"""Faults of a single run: killed trainers, hostile and damaged checkpoints, storage that
cannot be written or fills up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from raymix.cli import main
from raymix.engine import checkpoint
from raymix.engine.checkpoint import StorageError, load_checkpoint, save_checkpoint
from tests.faults.helpers import DIGITS, TINY, namespace_runner, raymix


def _train_args(out: Path, *extra: str) -> list[str]:
    return ["train", str(DIGITS), *TINY, f"training.output_dir={out}", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 1-epoch run's folder."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main([*_train_args(out, "training.epochs=1"), "--no-progress"]) == 0
    return out


# ---------------------------------------------------------------- hostile and damaged checkpoints


class _RunsCode:
    """Unpickling this object runs a shell command (what a crafted checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_cannot_run_code(tmp_path, trained, capsys, fault):
    marker = tmp_path / "code-ran"
    state = {**load_checkpoint(trained / "checkpoints" / "last.pt"), "extra": _RunsCode(marker)}
    crafted = tmp_path / "crafted.pt"
    torch.save(state, crafted)

    code = main(["eval", str(crafted)])
    err = capsys.readouterr().err.strip()
    assert "refused unread" in err and str(crafted) in err
    # Left in a run folder as its last checkpoint, it is not resumed from either.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(crafted.read_bytes())
    again = main([*_train_args(run, "training.epochs=1"), "--no-progress"])
    err_train = capsys.readouterr().err.strip()
    ok = code == again == 2 and not marker.exists() and "\n" not in err + err_train
    fault(
        "crafted checkpoint (code in its pickle) given to `raymix eval` or left as last.pt",
        "refused unread: exit 2, one line, no code run",
        f"exit {code} / {again}, code ran: {marker.exists()}",
        ok,
    )


@pytest.mark.parametrize("kind", ["truncated", "foreign torch file", "not a torch file", "empty"])
def test_a_damaged_or_foreign_checkpoint_is_one_line(tmp_path, trained, capsys, fault, kind):
    good = (trained / "checkpoints" / "last.pt").read_bytes()
    bad = tmp_path / "bad.pt"
    if kind == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif kind == "foreign torch file":
        torch.save({"weights": torch.zeros(3)}, bad)
    elif kind == "not a torch file":
        bad.write_text("hello")
    else:
        bad.write_bytes(b"")
    code = main(["eval", str(bad)])
    err = capsys.readouterr().err
    expected = "not a raymix checkpoint" if kind == "foreign torch file" else "damaged or not a torch file"
    ok = code == 2 and expected in err and str(bad) in err and err.count("\n") == 1
    fault(f"{kind} checkpoint given to `raymix eval`", "exit 2, one line naming the file",
          f"exit {code}: '{err.strip()[15:]}'", ok)  # fmt: skip


def test_a_damaged_last_checkpoint_is_not_resumed(tmp_path, trained, capsys, fault):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    good = (trained / "checkpoints" / "last.pt").read_bytes()
    (run / "checkpoints" / "last.pt").write_bytes(good[:1000])
    code = main([*_train_args(run, "training.epochs=1"), "--no-progress"])
    err = capsys.readouterr().err
    kept = (run / "checkpoints" / "last.pt").read_bytes() == good[:1000]  # left for the user to look at
    ok = code == 2 and "damaged" in err and "best.pt" in err and err.count("\n") == 1 and kept
    fault("damaged `last.pt` in a run folder, `raymix train` again",
          "not resumed, not overwritten: exit 2, one line saying what to do",
          f"exit {code}: '{err.strip()[15:]}'; file untouched: {kept}", ok)  # fmt: skip


# ---------------------------------------------------------------- a killed trainer


def test_a_trainer_killed_mid_epoch_resumes_writing_each_epoch_once(tmp_path, fault):
    out = tmp_path / "run"
    args = _train_args(out, "training.epochs=6", "training.checkpoint_every=2")
    history = out / "metrics.jsonl"
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "raymix", *args], cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                lines = history.read_text().splitlines() if history.exists() else []
                if len(lines) >= 4:  # epoch 3 written; its checkpoint is due only at epoch 4
                    break
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    before = [json.loads(line)["epoch"] for line in history.read_text().splitlines() if line.endswith("}")]
    saved = int(load_checkpoint(out / "checkpoints" / "last.pt")["epoch"])
    assert max(before) > saved, "killed too late to leave epochs after the checkpoint"
    resumed = raymix(*args, cwd=tmp_path)
    after = [json.loads(line)["epoch"] for line in history.read_text().splitlines()]
    lost = max(before) - saved  # trained again after the resume
    ok = resumed.returncode == 0 and after == list(range(7)) and f"after epoch {saved}" in resumed.stdout
    fault(
        "trainer killed (SIGKILL) mid-run, `checkpoint_every=2`",
        "resumes from the last checkpoint; metrics.jsonl has each epoch once",
        f"resumed after epoch {saved}, {lost} epoch(s) after it retrained; epochs logged {after}",
        ok,
    )


# ---------------------------------------------------------------- storage


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fault):
    """A write that fails with ENOSPC (/dev/full) leaves the last good file and no temporary one."""
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(1000)}, path)

    mkstemp = tempfile.mkstemp

    def full_disk(dir, prefix, suffix):
        fd, name = mkstemp(dir=dir, prefix=prefix, suffix=suffix)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", full_disk)
    with pytest.raises(StorageError) as error:
        save_checkpoint({"epoch": 2, "w": torch.ones(1000)}, path)
    monkeypatch.undo()
    kept = torch.load(path, weights_only=True)["epoch"]
    leftovers = sorted(p.name for p in path.parent.iterdir())
    ok = (
        str(error.value) == f"no space left on device writing {path}"
        and kept == 1
        and leftovers == ["last.pt"]
    )
    fault("disk full while a checkpoint is written",
          "one line naming the file; the previous checkpoint intact",
          f"'{error.value}'; last.pt holds epoch {kept}; files {leftovers}", ok)  # fmt: skip


NAMESPACE = namespace_runner()
needs_mounts = pytest.mark.skipif(
    NAMESPACE is None, reason="cannot mount a tmpfs in a private mount namespace"
)


@needs_mounts
def test_a_run_on_a_disk_that_fills_up_stops_with_one_line(tmp_path, fault):
    """A real small disk (tmpfs) that fills up once the first checkpoint is written: the next
    checkpoint fails with one line, exit 2, and the last good one still loads."""
    disk, out = tmp_path / "disk", tmp_path / "disk" / "run"
    disk.mkdir()
    train = " ".join([sys.executable, "-m", "raymix", *_train_args(out, "training.epochs=4")])
    script = f"""
        set -u
        mount -t tmpfs -o size=16m tmpfs {disk}
        {train} > {tmp_path}/train.out 2> {tmp_path}/train.err &
        pid=$!
        while [ ! -e {out}/checkpoints/last.pt ] && kill -0 $pid 2>/dev/null; do sleep 0.01; done
        free_kb=$(df -k --output=avail {disk} | tail -1)
        dd if=/dev/zero of={disk}/filler bs=16k count=$((free_kb / 16 - 4)) 2>/dev/null
        wait $pid
        echo $? > {tmp_path}/train.code
        ls -a {out}/checkpoints > {tmp_path}/files.txt
        cp {out}/checkpoints/last.pt {tmp_path}/kept.pt
    """
    done = subprocess.run([*NAMESPACE, "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    code = int((tmp_path / "train.code").read_text())
    err = (tmp_path / "train.err").read_text().strip()
    kept = int(load_checkpoint(tmp_path / "kept.pt")["epoch"])
    files = (tmp_path / "files.txt").read_text().split()
    ok = (
        code == 2 and err.startswith(f"raymix: error: no space left on device writing {out}/")
        and "\n" not in err and 1 <= kept < 4 and not any(f.endswith(".tmp") for f in files)
    )  # fmt: skip
    shown = err.replace(str(tmp_path), "...")
    fault("disk full during `raymix train` (a tmpfs filled after the first checkpoint)",
          "exit 2, one line; the last checkpoint intact",
          f"exit {code}: '{shown[15:]}'; last.pt holds epoch {kept}, loads", ok)  # fmt: skip


@needs_mounts
def test_a_read_only_output_folder_is_refused_before_training(tmp_path, fault):
    disk = tmp_path / "ro"
    disk.mkdir()
    train = " ".join([sys.executable, "-m", "raymix", *_train_args(disk / "run", "training.epochs=1")])
    script = f"mount -t tmpfs -o ro tmpfs {disk} && {train}; echo $? > {tmp_path}/code"
    done = subprocess.run([*NAMESPACE, "sh", "-c", script], capture_output=True, text=True, timeout=300)
    code = int((tmp_path / "code").read_text())
    err = done.stderr.strip()
    ok = (
        code == 2
        and err
        == f"raymix: error: training.output_dir: cannot write to {disk / 'run'}: Read-only file system"
    )
    fault("read-only output folder (`raymix train`)", "exit 2, one line, nothing trained",
          f"exit {code}: '{err[15:]}'", ok)  # fmt: skip


def test_an_output_folder_that_cannot_exist_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main([*_train_args(blocker / "run", "training.epochs=1"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raymix: error: training.output_dir: cannot write to {blocker / 'run'}")
    assert err.count("\n") == 1
