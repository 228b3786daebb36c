"""Faults as one-line errors: full disk, read-only folder, truncated raster, interrupts, kill -9."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import rasterio
import torch
from click.testing import CliRunner
from rasterio.errors import RasterioIOError

from geoseg_cli.cli import cli
from geoseg_cli.faults import temp_prefix
from geoseg_cli.raster import atomic_output
from tests.conftest import TINY_TRAIN, synthetic_scene, write_raster

torch.set_num_threads(2)

Usage = namedtuple("Usage", "total used free")


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


def full_disk(monkeypatch) -> None:
    """Make every folder look full (what a write that failed for want of space finds)."""
    monkeypatch.setattr("geoseg_cli.faults.shutil.disk_usage", lambda path: Usage(2**30, 2**30, 0))


def predict_args(scene, model, out, *extra) -> list:
    return ["predict", scene["image"], "-m", model, "-o", out, *extra]


def test_gdal_write_failure_on_a_full_disk_names_the_output(
    scene, tiny_checkpoint, tmp_path, monkeypatch
):
    def failing_write(self, *args, **kwargs):
        # what rasterio raises once GDAL cannot write a block: no errno, no file name
        raise RasterioIOError("Write failed. See previous exception for details.")

    monkeypatch.setattr(rasterio.io.DatasetWriter, "write", failing_write)
    full_disk(monkeypatch)
    out = tmp_path / "out" / "pred.tif"
    out.parent.mkdir()
    result = run(*predict_args(scene, tiny_checkpoint, out, "--probabilities"))
    assert result.exit_code == 1
    assert last_line(result) == f"Error: {out}: disk full; free space or write elsewhere"
    assert list(out.parent.iterdir()) == []


def test_a_file_gdal_leaves_truncated_at_close_is_caught(
    scene, tiny_checkpoint, tmp_path, monkeypatch
):
    """GDAL writes its cached blocks at close and raises nothing when the disk is full."""
    close = rasterio.io.DatasetWriter.close

    def truncating_close(self):
        name, writing = self.name, not self.closed and self.mode == "w"
        close(self)
        if writing:
            os.truncate(name, os.path.getsize(name) // 2)

    monkeypatch.setattr(rasterio.io.DatasetWriter, "close", truncating_close)
    full_disk(monkeypatch)
    out = tmp_path / "out" / "pred.tif"
    out.parent.mkdir()
    result = run(*predict_args(scene, tiny_checkpoint, out, "--co", "COMPRESS=NONE"))
    assert result.exit_code == 1
    assert last_line(result) == f"Error: {out}: disk full; free space or write elsewhere"
    assert list(out.parent.iterdir()) == []


def test_other_write_failures_name_the_output_not_a_temporary_file(
    scene, tiny_checkpoint, tmp_path, monkeypatch
):
    def failing_write(self, *args, **kwargs):
        raise RasterioIOError("Write failed.") from OSError("TIFFAppendToStrip: Write error")

    monkeypatch.setattr(rasterio.io.DatasetWriter, "write", failing_write)
    out = tmp_path / "pred.tif"
    result = run(*predict_args(scene, tiny_checkpoint, out))
    assert result.exit_code == 1
    message = last_line(result)
    assert message.startswith(f"Error: {out}: writing failed (TIFFAppendToStrip: Write error)")
    assert ".tmp" not in message and "unexpected" not in message


def test_a_full_disk_while_saving_a_checkpoint(chips, tmp_path, monkeypatch):
    def failing_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK")  # torch's zip writer reports a short write so:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576")

    monkeypatch.setattr(torch, "save", failing_save)
    full_disk(monkeypatch)
    run_dir = tmp_path / "run"
    result = run("train", chips, "-o", run_dir, "--epochs", "1", *TINY_TRAIN)
    assert result.exit_code == 1
    best = run_dir / "best.pt"
    assert last_line(result) == f"Error: {best}: disk full; free space or write elsewhere"
    assert not run_dir.exists()  # nothing of the failed epoch, config.toml included


def test_read_only_output_folder_is_refused_before_any_work(
    scene, tiny_checkpoint, tmp_path, monkeypatch
):
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access  # as root a chmod'ed folder stays writable: ask os.access instead
    monkeypatch.setattr(
        "geoseg_cli.raster.os.access", lambda p, *args: Path(p) != locked and access(p, *args)
    )
    result = run(*predict_args(scene, tiny_checkpoint, locked / "pred.tif"))
    assert result.exit_code == 1
    assert last_line(result) == (
        f"Error: {locked / 'pred.tif'}: folder {locked} is not writable; write elsewhere or fix "
        "its permissions"
    )

    # a folder that refuses the temporary folder all the same (ACLs, a race)
    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/.pred.tif.x.tmp")

    monkeypatch.setattr("geoseg_cli.raster.tempfile.mkdtemp", refuse)
    result = run(*predict_args(scene, tiny_checkpoint, tmp_path / "pred.tif"))
    assert result.exit_code == 1
    assert last_line(result).startswith(
        f"Error: {tmp_path / 'pred.tif'}: writing failed (Permission denied); check the folder"
    )


def truncated(path: Path) -> Path:
    """``path`` cut after its header and first strips: it opens, then fails mid-read."""
    data = path.read_bytes()
    cut = path.with_name(f"cut_{path.name}")
    cut.write_bytes(data[: len(data) // 2])
    with rasterio.open(cut) as src:
        assert src.shape == (120, 130)
    return cut


@pytest.mark.parametrize("command", ["predict-window", "predict-shared", "tile", "evaluate"])
def test_a_truncated_raster_is_named_as_damaged(tiny_checkpoint, tmp_path, command):
    image, labels = synthetic_scene(120, 130, seed=2)
    image_path = write_raster(tmp_path / "image.tif", image)
    labels_path = write_raster(tmp_path / "labels.tif", labels)
    cut = truncated(labels_path if command == "evaluate" else image_path)
    args = {
        "predict-window": ["predict", cut, "-m", tiny_checkpoint, "-o", tmp_path / "p.tif"],
        "tile": ["tile", cut, "--labels", labels_path, "-o", tmp_path / "chips", "--size", "32"],
        "evaluate": ["evaluate", cut, labels_path],
    }
    args["predict-shared"] = [*args["predict-window"], "--engine", "shared"]
    before = sorted(tmp_path.iterdir())
    result = run(*args[command])
    assert result.exit_code == 1
    message = last_line(result)
    assert message.startswith(f"Error: {cut}: reading failed (")
    fix = "the file is damaged or truncated: check it with gdalinfo -checksum and copy it again"
    assert message.endswith(fix.replace("copy it", "copy or write it"))
    assert sorted(tmp_path.iterdir()) == before


def test_temporary_folders_of_killed_runs_are_swept(tmp_path):
    out = tmp_path / "pred.tif"
    code = (
        "import os, signal, sys\n"
        "from geoseg_cli.raster import atomic_output\n"
        "with atomic_output(sys.argv[1]) as tmp:\n"
        "    tmp.write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=Path(__file__).parents[1])
    assert killed.wait() == -signal.SIGKILL
    (left,) = tmp_path.iterdir()
    host = temp_prefix(out).rsplit(".", 2)[0]  # .pred.tif.HOST
    assert left.name.startswith(f"{host}.{killed.pid}.") and left.name.endswith(".tmp")
    assert (left / "pred.tif").read_text() == "half"
    # one of a process still running and one of another host are kept
    running = tmp_path / f"{temp_prefix(out)}abcd1234.tmp"
    other_host = tmp_path / ".pred.tif.elsewhere.1.abcd1234.tmp"
    running.mkdir()
    other_host.mkdir()
    with atomic_output(out) as tmp:
        tmp.write_text("whole")
    assert out.read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [running.name, other_host.name, "pred.tif"]
    )
    shutil.rmtree(running)


def test_ctrl_c_and_sigterm_exit_130_and_143_and_train_points_to_resume(
    chips, tmp_path, monkeypatch
):
    from geoseg_cli import train as train_module

    save = train_module._Trainer._save
    signals = iter([signal.SIGINT, signal.SIGTERM])

    def save_then_interrupt(self, *args):
        save(self, *args)
        # right after epoch 1 was written, synchronously: what Python's SIGINT handler raises
        # (a shell's background job ignores SIGINT), then geoseg's own SIGTERM handler
        signum = next(signals)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.getsignal(signum)(signum, None)

    monkeypatch.setattr(train_module._Trainer, "_save", save_then_interrupt)
    run_dir = tmp_path / "run"
    args = ["train", chips, "-o", run_dir, "--epochs", "3", *TINY_TRAIN]
    result = run(*args)
    assert result.exit_code == 130
    assert last_line(result) == (
        f"Error: interrupted; {run_dir / 'last.pt'} (epoch 1) is kept: continue from it with "
        f"--resume {run_dir}"
    )
    result = run("train", "--resume", run_dir)
    assert result.exit_code == 143 and "(epoch 2) is kept" in last_line(result)

    def interrupt_at_once(self, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module._Trainer, "_train_epoch", interrupt_at_once)
    result = run(*args[:3], tmp_path / "early", *args[4:])
    assert result.exit_code == 130
    assert last_line(result) == "Error: interrupted; no epoch had finished: nothing was kept"
    assert not (tmp_path / "early").exists()
