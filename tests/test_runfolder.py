"""macl.run.folder and the input checks of issue 13, in-process and without training: the lock (live holder,
stale holder), atomic writes under a full disk, appends that never leave half a line, log repair on resume,
the resume fallback from a damaged latest.pt, stale temporary files; typed settings; label values, NIfTI
headers that claim more than the file holds, extreme / constant intensities, malformed dataset.json fields."""
import errno
import gzip
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from macl.run import files, folder as runfolder
from macl.settings.config import MethodConfig, NetConfig, OptimConfig, PretrainConfig, TrainConfig, apply_overrides
from macl.settings.fields import field_types
from macl.data import DataError, PreprocessConfig, PretrainDataConfig, open_dataset
from macl.data.loading import read_nifti
from macl.data.preprocess import zscore
from macl.data.value_checks import check_intensities, classes_from_values
from macl.finetune import FinetuneConfig
from macl.semi.loop import SemiConfig


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _full_disk(monkeypatch, when=lambda fh: True, partial=False):
    """Patch the one writer of run folders: writes for which `when(fh)` holds raise ENOSPC (after writing half
    of the data when `partial`)."""
    real = files._write_all

    def write(fh, data):
        if when(fh):
            if partial:
                fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fh, data)
    monkeypatch.setattr(files, "_write_all", write)


# ------------------------------------------------------------------------------------------------ lock
def test_lock_refuses_a_live_holder_names_it_and_releases(tmp_path):
    run = tmp_path / "run"
    first = runfolder.RunLock(run, "pretrain").acquire()
    holder = runfolder.read_lock(run)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(runfolder.RunLockedError) as err:
        runfolder.RunLock(run, "finetune").acquire()  # a second open file: flock conflicts even in one process
    text = str(err.value)
    assert str(run / ".macl.lock") in text and f"pid {os.getpid()}" in text and "macl pretrain" in text
    first.release()
    assert not run.exists()  # created by the lock and never written: removed again
    with runfolder.RunLock(run, "pretrain"):
        (run / "x").write_text("1")
    assert run.is_dir() and not (run / ".macl.lock").exists()


def test_a_stale_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    pid = _dead_pid()
    (run / ".macl.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "pretrain"}))
    with caplog.at_level(logging.WARNING, logger="macl"):
        lock = runfolder.RunLock(run, "pretrain").acquire()
    assert f"taking over the stale lock of pid {pid}" in caplog.text
    assert runfolder.read_lock(run)["pid"] == os.getpid()
    lock.release()
    # a lock from another machine cannot be checked: refused, named
    (run / ".macl.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(runfolder.RunLockedError, match="pid 1 on host elsewhere.example"):
        runfolder.RunLock(run, "pretrain").acquire()


# ------------------------------------------------------------------------------------------------ writes
def test_full_disk_keeps_the_old_file_removes_the_temporary_and_names_the_path(tmp_path, monkeypatch):
    target = tmp_path / "latest.pt"
    runfolder.save_torch_atomic({"step": 1, "w": torch.ones(3)}, target)
    before = target.read_bytes()
    _full_disk(monkeypatch, partial=True)
    with pytest.raises(runfolder.DiskFullError) as err:
        runfolder.save_torch_atomic({"step": 2, "w": torch.zeros(1000)}, target)  # torch hides it as RuntimeError
    assert str(err.value) == f"{target}: no space left on device" and err.value.errno == errno.ENOSPC
    with pytest.raises(runfolder.DiskFullError, match="config.json: no space left on device"):
        runfolder.atomic_write(tmp_path / "config.json", "{}")
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


def test_a_failed_append_leaves_no_half_line(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    runfolder.append_text(log, '{"step": 1}\n')
    _full_disk(monkeypatch, partial=True)
    with pytest.raises(runfolder.DiskFullError, match="log.jsonl: no space left on device"):
        runfolder.append_text(log, '{"step": 2, "loss": 1.0}\n')
    with pytest.raises(runfolder.DiskFullError):
        with runfolder.JsonlAppender(log) as out:
            out.write('{"step": 2}\n')
    assert log.read_text() == '{"step": 1}\n'


def test_repair_log_drops_a_partial_line_and_entries_past_the_checkpoint(tmp_path, caplog):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    with caplog.at_level(logging.WARNING, logger="macl"):
        kept = runfolder.repair_log(log, 4)
    assert [r["step"] for r in kept] == [1, 2, 3, 4]
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert f"{log}: dropped a partial last line" in caplog.text


def test_resume_falls_back_to_the_newest_loadable_step_checkpoint(tmp_path, caplog):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for step in (2, 4):
        runfolder.save_torch_atomic({"step": step, "model": {"w": torch.full((2,), float(step))}}, ck / f"step_{step:07d}.pt")
    (ck / "latest.pt").write_bytes(b"PK\x03\x04 truncated")
    with caplog.at_level(logging.WARNING, logger="macl"):
        path, ckpt = runfolder.find_resume_checkpoint(ck)
    assert path == ck / "step_0000004.pt" and ckpt["step"] == 4
    assert f"{ck / 'latest.pt'}: cannot load checkpoint (truncated" in caplog.text and "step_0000004.pt" in caplog.text
    (ck / "step_0000004.pt").write_bytes(b"")
    assert runfolder.find_resume_checkpoint(ck)[0] == ck / "step_0000002.pt"
    (ck / "step_0000002.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError) as err:
        runfolder.find_resume_checkpoint(ck)
    assert str(ck / "latest.pt") in str(err.value) and "no loadable step_*.pt" in str(err.value)
    assert "weights_only=False" not in str(err.value)


def test_clean_temp_removes_files_of_dead_writers_only(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    dead = tmp_path / "checkpoints" / f"latest.pt.tmp{_dead_pid()}"
    live = tmp_path / f"log.jsonl.tmp{os.getppid()}"  # the parent (pytest's launcher) is alive
    dead.write_bytes(b"half")
    live.write_bytes(b"busy")
    assert runfolder.clean_temp(tmp_path) == [dead]
    assert not dead.exists() and live.exists()


# ------------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("override, message", [
    ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
    ("optim.lr=inf", "optim.lr must be a finite number, got 'inf'"),  # --set keeps it a string
    ("optim.lr=1e400", "optim.lr must be a finite number, got inf"),
    ("net.base_width=4.5", "net.base_width must be an integer, got 4.5"),
    ("train.steps=2.7", "train.steps must be an integer, got 2.7"),
    ("train.deterministic=maybe", "train.deterministic must be true or false, got 'maybe'"),
    ("method.temperature=true", "method.temperature must be a number, got True"),
])
def test_wrong_types_are_rejected_by_name(override, message):
    with pytest.raises(ValueError) as err:
        apply_overrides(PretrainConfig(), [override])
    assert str(err.value) == message


def test_types_are_coerced_and_every_field_declares_one():
    for bad in (float("inf"), float("nan")):  # what argparse makes of --lr inf / --lr nan
        with pytest.raises(ValueError, match="optim.lr must be a finite number"):
            OptimConfig(lr=bad)
    cfg = apply_overrides(PretrainConfig(), ["train.steps=3.0", "optim.lr=1", "net.depth=2"])
    assert cfg.train.steps == 3 and type(cfg.train.steps) is int and type(cfg.optim.lr) is float
    assert MethodConfig(threshold=np.float32(0.25)).threshold == pytest.approx(0.25)
    assert MethodConfig(threshold=torch.tensor(0.25)).threshold == pytest.approx(0.25)
    assert FinetuneConfig(patch_size=[32.0, 32]).patch_size == (32, 32)
    for cls in (NetConfig, MethodConfig, OptimConfig, TrainConfig, FinetuneConfig, SemiConfig, PreprocessConfig,
                PretrainDataConfig):
        missing = [name for name, tp in field_types(cls).items() if tp is None]
        assert not missing, f"{cls.__name__} fields without a type: {missing}"


def test_a_zero_labels_fraction_is_refused():
    for make in (lambda: FinetuneConfig(labels_fraction=0), lambda: SemiConfig(labels_fraction=0.0)):
        with pytest.raises(ValueError, match=r"labels_fraction must be in \(0, 1\], got 0"):
            make()


def test_np_float32_and_0d_tensor_thresholds_are_accepted_by_the_loss():
    from macl_kernels import positional_sup_con
    f, pos = torch.randn(8, 16), torch.rand(8)
    ref = positional_sup_con(f, pos, threshold=0.25, impl="reference")
    for thr in (np.float32(0.25), torch.tensor(0.25)):
        torch.testing.assert_close(positional_sup_con(f, pos, threshold=thr, impl="reference"), ref)


# ------------------------------------------------------------------------------------------------ data
def test_label_values_must_be_0_to_k():
    assert classes_from_values([0, 1, 2], "/d") == {0: "background", 1: "class_1", 2: "class_2"}
    with pytest.raises(DataError, match=r"skip \[2, 3"):
        classes_from_values([0, 1, 255], "/d")  # not 256 classes
    with pytest.raises(DataError, match="above 255"):
        classes_from_values(range(300), "/d")
    with pytest.raises(DataError, match="negative label values"):
        classes_from_values([-1, 0, 1], "/d")


def _nifti_claiming(path: Path, shape, payload: bytes) -> Path:
    """A NIfTI file whose header claims `shape` float32 voxels but holds only `payload` after the header."""
    hdr = nib.Nifti1Header() if max(shape) < 2 ** 15 else nib.Nifti2Header()  # NIfTI-1 sizes are int16
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape(shape)
    hdr["vox_offset"] = len(hdr.binaryblock) + 4
    raw = hdr.binaryblock + b"\x00" * 4 + payload
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


@pytest.mark.parametrize("name, shape", [("a.nii.gz", (800, 800, 800)), ("b.nii.gz", (10 ** 5,) * 3),
                                         ("c.nii", (800, 800, 800))])
def test_a_header_claiming_more_than_the_file_holds_fails_before_allocating(tmp_path, name, shape):
    import tracemalloc
    path = _nifti_claiming(tmp_path / name, shape, b"\x00" * 16)
    tracemalloc.start()
    with pytest.raises(DataError) as err:
        read_nifti(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(err.value).startswith(f"{path}: header claims {'x'.join(map(str, shape))} float32")
    assert peak < 50 * 2 ** 20  # no claimed-size array was allocated


def test_a_truncated_gzip_is_stream_checked(tmp_path, monkeypatch):
    from macl.data import nifti_check
    monkeypatch.setattr(nifti_check, "STREAM_CHECK_BYTES", 1024)  # stream-check this small file too
    path = _nifti_claiming(tmp_path / "t.nii.gz", (32, 32, 32), np.zeros(32 * 32 * 16, np.float32).tobytes())
    with pytest.raises(DataError, match="decompresses to only"):
        read_nifti(path)
    good = tmp_path / "g.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((32, 32, 32), np.float32), np.eye(4)), str(good))
    assert read_nifti(good)[0].shape == (32, 32, 32)


def test_extreme_and_constant_intensities_warn_and_the_zscore_survives(caplog):
    image = np.random.default_rng(0).normal(size=(1, 8, 8, 4)).astype(np.float32)
    image[0, 0, 0, 0] = 3e38
    with caplog.at_level(logging.WARNING, logger="macl"):
        assert check_intensities(image, "vol.nii.gz")
        check_intensities(np.full((1, 4, 4, 4), 7.0, np.float32), "flat.nii.gz")
    assert "vol.nii.gz: channel 0 has extreme intensities" in caplog.text and "flat.nii.gz: channel 0 is constant" in caplog.text
    z = zscore(image)
    assert np.isfinite(z).all() and np.count_nonzero(z) == z.size  # not all zeros (float32 statistics overflowed)
    ref = (image.astype(np.float64) - image.astype(np.float64).mean()) / image.astype(np.float64).std()
    np.testing.assert_allclose(z, ref.astype(np.float32), rtol=1e-5)


@pytest.mark.parametrize("patch, key", [({"channel_names": {"a": "MR"}}, "'channel_names' keys must be channel numbers"),
                                        ({"training": [{"image": "imagesTr/x.nii.gz", "label": 5}]},
                                         "'training[0].label' must be a file path, got 5"),
                                        ({"file_ending": 3}, "'file_ending' must be a string")])
def test_malformed_dataset_json_fields_are_one_line_naming_file_and_key(tmp_path, patch, key):
    (tmp_path / "imagesTr").mkdir()
    meta = {"labels": {"background": 0, "organ": 1}, **patch}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError) as err:
        open_dataset(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'dataset.json'}: {key}")
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": 5}]}))
    with pytest.raises(DataError, match=r"list.json: 'training\[0\].label' must be a file path, got 5"):
        open_dataset(listed)


def test_a_full_cache_disk_names_the_cache_folder(tmp_path, monkeypatch):
    from macl.data.preprocess import Volume, VolumeCache
    from macl.data.readers import CaseRecord
    cache = VolumeCache(tmp_path / "cache")
    vol = Volume("c0", np.zeros((1, 4, 4, 4), np.float32), None, (1.0, 1.0, 1.0), np.eye(4), "c0.nii.gz")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "save", full)
    with pytest.raises(runfolder.DiskFullError, match=f"^{tmp_path / 'cache'}: no space left on device$"):
        cache.put(CaseRecord("c0", (tmp_path / "c0.nii.gz",)), "k", vol)
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written entry
