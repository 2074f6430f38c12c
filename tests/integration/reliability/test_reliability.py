"""Reliability under faults: full and read-only disks, a second writer, killed writers' temporary files, damaged
run files and divergence each end with one line and exit code 2, leaving a resumable folder or nothing; a run
killed at random moments and resumed each time ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fewshot_sla.cli import main
from fewshot_sla.data import prepare as prepare_module
from fewshot_sla.locks import exclusive, lock_path
from tests.helpers.paths import REPO
from tests.integration.reliability.test_resume import FLAGS, assert_same_run


def cli(capsys: pytest.CaptureFixture, data_root: Path, *args: str) -> tuple[int, str]:
    """Exit code and stderr of one in-process command; a traceback fails the test."""
    code = main(["--data-root", str(data_root), *args])
    return code, capsys.readouterr().err


def one_line(code: int, err: str) -> str:
    """The one error line a terminal shows (a progress bar erases itself with carriage returns)."""
    lines = err.split("\r")[-1].strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fewshot-sla: error: "), (code, err)
    return lines[0]


def run(data_root: Path, out: Path, *extra: str) -> list[str]:
    return ["run", *FLAGS, "--out", str(out), *extra]


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.tmp")) if folder.exists() else []


@pytest.fixture(scope="module")
def reference(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["--data-root", str(data_root), *run(data_root, out)]) == 0
    return out


class FullDisk:
    """``torch.save`` fails like torch on a full disk (a part of the file written, then 'unexpected pos'), from
    its ``after``-th call on; the file system reports almost no free space."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, after: int) -> None:
        self.calls, self.after, self.save = 0, after, torch.save
        monkeypatch.setattr(torch, "save", self)
        monkeypatch.setattr("fewshot_sla.io_errors.free_bytes", lambda path: 4096)

    def __call__(self, obj: object, path: Path) -> None:
        self.calls += 1
        if self.calls < self.after:
            return self.save(obj, path)
        Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4544 vs 4432")


def test_a_full_disk_before_the_first_checkpoint_leaves_nothing(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    FullDisk(monkeypatch, after=1)
    out = tmp_path / "runs" / "a"
    line = one_line(*cli(capsys, data_root, *run(data_root, out, "--fit-memory", "off")))
    # The first checkpoint is the training state saved as the first validation begins.
    assert f"cannot write the checkpoint {out / 'checkpoints' / 'last.pt'}: no space is left on the device" in line
    assert line.endswith("then run the command again (the new run folder was removed)")
    assert not (tmp_path / "runs").exists()  # no run folder, lock or temporary file: not even the parent made for it


def test_a_full_disk_after_a_checkpoint_leaves_a_folder_that_resumes_to_the_same_run(
    data_root: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    full = FullDisk(monkeypatch, after=3)  # last.pt as step 2's validation begins and best.pt, then the disk is full
    out = tmp_path / "run"
    line = one_line(*cli(capsys, data_root, *run(data_root, out)))
    assert "no space is left on the device; free some space (or write elsewhere), then continue with" in line
    assert f"'fewshot-sla run --resume --out {out}'" in line
    assert temporaries(out) == [] and not lock_path(out).exists()
    monkeypatch.setattr(torch, "save", full.save)
    assert main(["--data-root", str(data_root), *run(data_root, out, "--resume")]) == 0
    assert_same_run(reference, out)


def test_a_failed_write_of_the_metrics_log_names_the_run_folder(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from fewshot_sla.engine import train as train_module

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_module.Trainer, "step", full)
    out = tmp_path / "run"
    line = one_line(*cli(capsys, data_root, *run(data_root, out)))
    assert f"cannot write into the run folder {out}: no space is left on the device" in line
    assert not out.exists()


def test_a_full_disk_while_preparing_a_store_leaves_nothing(
    tmp_path: Path, small_synthetic: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    calls = {"n": 0}
    append = prepare_module.append_rows

    def fails_second(*args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the way h5py reports it: the errno only inside the text
            raise OSError("Can't write data (file write failed: errno = 28, error message = 'No space left on device')")
        append(*args)

    monkeypatch.setattr(prepare_module, "append_rows", fails_second)
    root = tmp_path / "data"
    root.mkdir()
    line = one_line(*cli(capsys, root, "data", "prepare", "synthetic"))
    assert f"cannot write {root / 'synthetic.h5'}: no space is left on the device" in line
    assert sorted(root.iterdir()) == []


def test_a_full_disk_while_writing_the_lock_file_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A disk with no block left: the lock file is created, but the holder's name cannot be written into it (this
    was an unnamed 'cannot read or write' line)."""

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    root = tmp_path / "data"
    line = one_line(*cli(capsys, root, "data", "prepare", "synthetic"))
    assert f"cannot write the lock file {root / '.synthetic.h5.lock'}: no space is left on the device" in line
    assert not root.exists()  # the folder made for the lock is gone too


def test_a_folder_where_the_store_goes_is_refused_before_anything_is_written(
    tmp_path: Path, small_synthetic: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """(Prepare wrote the whole store and then failed to rename it onto the folder; reading one named HDF5's
    'file read failed' text.)"""
    root = tmp_path / "data"
    (root / "synthetic.h5").mkdir(parents=True)
    monkeypatch.setattr(prepare_module, "_write_store", lambda *args: pytest.fail("the store was written"))
    line = one_line(*cli(capsys, root, "data", "prepare", "synthetic"))
    assert line.endswith(
        f"{root / 'synthetic.h5'} is a folder, not a dataset store; move it away, then run the command again"
    )
    line = one_line(*cli(capsys, root, "data", "info", "synthetic"))
    assert (
        f"store {root / 'synthetic.h5'} is a folder, not a file; move it away, then run 'fewshot-sla data prepare"
        in line
    )


def test_an_image_whose_file_name_is_not_utf8_is_imported_under_an_escaped_name(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A file name from another system (Latin-1 bytes; Python holds them as surrogate escapes) was a traceback: the
    store keeps UTF-8 text, so such bytes are written as \\xNN."""
    from PIL import Image

    from fewshot_sla.data.store import DatasetStore

    source = tmp_path / "images"
    for c in range(10):
        (source / f"c{c}").mkdir(parents=True)
        for i in range(3):
            name = os.fsdecode(b"caf\xe9.png") if (c, i) == (0, 0) else f"{i}.png"
            Image.new("RGB", (8, 8), (20 * c, 10 * i, 0)).save(source / f"c{c}" / name)
    root = tmp_path / "data"
    prepare = ["data", "prepare", "mine", "--layout", "imagefolder", "--source", str(source)]
    assert main(["--data-root", str(root), *prepare]) == 0, capsys.readouterr().err
    store = DatasetStore(root / "mine.h5")
    ids = [i for name in store.split_names for i in store.split(name).image_ids]
    assert "c0/caf\\xe9.png" in ids and store.verify()


ZEROED_BLOCKS = """
import json, sys
from pathlib import Path
from fewshot_sla.data.store import DatasetStore
from fewshot_sla.errors import UserError

data, path, counts = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2]), {}
for offset in range(0, len(data), 4096):
    damaged = bytearray(data)
    damaged[offset : offset + 4096] = bytes(len(damaged[offset : offset + 4096]))
    path.write_bytes(damaged)
    try:
        store = DatasetStore(path)
        for name in store.split_names:
            store.split(name)  # checked against its digest
        outcome = "loaded"
    except UserError:
        outcome = "refused"
    except Exception as err:
        outcome = f"{type(err).__name__} at {offset}: {err}"
    counts[outcome] = counts.get(outcome, 0) + 1
print(json.dumps(counts))
"""


def test_a_store_with_any_block_zeroed_is_refused_or_loads_checked_never_hangs(
    tmp_path: Path, small_synthetic: int
) -> None:
    """A file system losing a block (zeros where a 4 KB block was), for every block of a store: one line, or the
    store loads with every split matching its digest. Stores keep their text in fixed-width strings and use the
    HDF5 1.10 format, whose metadata is checksummed: with variable-length strings (HDF5's global heap has no
    checksum) a zeroed heap sent HDF5 into an endless loop reading the store's attributes. Run in a subprocess
    with a time limit, so that a hang or a crash fails the test."""
    root = tmp_path / "data"
    prepare_module.prepare("synthetic", data_root=root, progress=False)
    command = [sys.executable, "-c", ZEROED_BLOCKS, str(root / "synthetic.h5"), str(tmp_path / "damaged.h5")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout)
    assert set(counts) <= {"refused", "loaded"}, counts
    assert counts["refused"] > counts.get("loaded", 0)


def test_a_changed_byte_in_a_checkpoint_is_refused_not_evaluated(
    data_root: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """torch does not check the CRC-32 of a checkpoint's records, so a flipped bit in a tensor went into the
    evaluation unnoticed."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    best = out / "checkpoints" / "best.pt"
    content = bytearray(best.read_bytes())
    content[len(content) // 2] ^= 0x10
    best.write_bytes(content)
    line = one_line(*cli(capsys, data_root, "eval", str(out)))
    assert f"checkpoint {best} is damaged (cut short or changed, or not a fewshot-sla checkpoint)" in line


@pytest.mark.parametrize("damage", [b"5\n", b'{"step": "x"}\n', b'{"step": 1, "loss": caf\xe9}\n'])
def test_a_damaged_line_of_the_metrics_log_is_dropped_on_resume(
    data_root: Path, tmp_path: Path, damage: bytes, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert main(["--data-root", str(data_root), *run(data_root, out, "--max-steps", "1")]) == 0
    with open(out / "metrics.jsonl", "ab") as log:
        log.write(damage)
    capsys.readouterr()
    code, err = cli(capsys, data_root, *run(data_root, out, "--resume"))
    assert code == 0, err
    assert damage not in (out / "metrics.jsonl").read_bytes()


def read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Every file opened for writing or creating under ``folder`` fails with EROFS (a read-only file system)."""
    real = os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def open_(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if flags & writing and str(Path(path).absolute()).startswith(str(folder)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)


def test_a_read_only_data_root_or_run_folder_is_one_line(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    read_only(monkeypatch, tmp_path)
    line = one_line(*cli(capsys, root, "data", "prepare", "synthetic"))
    assert "the file system is read-only; choose a writable folder" in line and sorted(root.iterdir()) == []
    line = one_line(*cli(capsys, data_root, *run(data_root, tmp_path / "runs" / "a")))
    assert "cannot create the lock file for run folder" in line and "read-only" in line
    assert not (tmp_path / "runs").exists()


HOLDER = """
import sys, time
from pathlib import Path
from fewshot_sla.locks import exclusive
with exclusive(Path(sys.argv[1]), "it", "wait"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold(lock_file: Path, seconds: float = 60) -> subprocess.Popen:
    """Another process holding ``lock_file`` (returns once it holds it)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_file), str(seconds)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_of_a_run_folder_or_a_store_is_refused_naming_the_first(
    data_root: Path, tmp_path: Path, small_synthetic: int, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    holder = hold(lock_path(out))
    try:
        line = one_line(*cli(capsys, data_root, *run(data_root, out)))
        assert f"run folder {out} is being written by process {holder.pid} on " in line
        assert line.endswith("wait for it to end, or choose another --out") and not out.exists()
        root = tmp_path / "data"
        store_holder = hold(lock_path(root / "synthetic.h5"))
        try:
            line = one_line(*cli(capsys, root, "data", "prepare", "synthetic"))
            assert f"is being written by process {store_holder.pid}" in line
        finally:
            store_holder.kill()
            store_holder.wait()
    finally:
        holder.kill()  # a killed holder leaves no stale lock
        holder.wait()
    assert main(["--data-root", str(data_root), *run(data_root, out, "--max-steps", "1")]) == 0
    assert not lock_path(out).exists()


def test_a_first_use_of_the_generated_set_waits_for_a_concurrent_one(
    tmp_path: Path, small_synthetic: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fewshot_sla.data.catalog import open_store

    root = tmp_path / "data"
    holder = hold(lock_path(root / "synthetic.h5"), seconds=1.0)
    start = time.perf_counter()
    store = open_store("synthetic", root)
    assert time.perf_counter() - start > 0.3 and store.checked  # it waited, then generated the store
    holder.wait()


def test_a_second_lock_in_the_same_process_is_refused_too(tmp_path: Path) -> None:
    target = tmp_path / "x"
    held = exclusive(lock_path(target), "x", "wait")
    refused = pytest.raises(Exception, match=rf"x is being written by process {os.getpid()} on ")
    with held, refused, exclusive(lock_path(target), "x", "wait"):
        pass
    assert not lock_path(target).exists()


def test_temporary_files_of_killed_writers_are_removed_by_the_next_writer(
    data_root: Path, tmp_path: Path, small_synthetic: int, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert main(["--data-root", str(data_root), *run(data_root, out, "--max-steps", "1")]) == 0
    stale = [out / "checkpoints" / ".best.pt.4242.k7_q2.tmp", out / ".metrics.jsonl.99.abc.tmp"]
    for path in stale:
        path.write_bytes(b"left by a killed process")
    keep = out / "notes.tmp"  # not one of ours
    keep.write_text("mine")
    assert main(["--data-root", str(data_root), *run(data_root, out, "--resume", "--max-steps", "2")]) == 0
    assert not any(p.exists() for p in stale) and keep.exists()
    root = tmp_path / "data"
    assert main(["--data-root", str(root), "data", "prepare", "synthetic"]) == 0
    mine, other = root / ".synthetic.h5.311.x1.tmp", root / ".cub.h5.312.x2.tmp"
    mine.write_bytes(b"270 MB, once")
    other.write_bytes(b"another store's: its own prepare cleans it")
    assert main(["--data-root", str(root), "data", "prepare", "synthetic", "--force"]) == 0
    assert not mine.exists() and other.exists()


def test_divergence_before_any_checkpoint_names_none_and_leaves_nothing(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    line = one_line(*cli(capsys, data_root, *run(data_root, out, "--lr", "1e30", "--optimizer", "sgd")))
    assert "training diverged: the loss is nan at step" in line
    assert "no checkpoint had been saved yet" in line and line.endswith("then run again")
    assert not out.exists()


def test_a_damaged_results_file_is_rebuilt_by_resuming(
    data_root: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "results.json").write_text('{"schema_version": 3, "status": "fini')  # cut short by a crash
    line = one_line(*cli(capsys, data_root, "eval", str(out)))
    assert f"{out / 'results.json'} is damaged" in line and f"'fewshot-sla run --resume --out {out}'" in line
    assert main(["--data-root", str(data_root), *run(data_root, out, "--resume")]) == 0
    rebuilt, original = (json.loads((p / "results.json").read_text()) for p in (out, reference))
    assert rebuilt["evaluation"]["accuracy"] == original["evaluation"]["accuracy"]
    assert rebuilt["train"]["best_step"] == original["train"]["best_step"]


def test_the_error_boundary_turns_stray_os_errors_into_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from fewshot_sla.cli import data as data_cli

    def broken(args):  # type: ignore[no-untyped-def]
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x.h5"))

    monkeypatch.setattr(data_cli, "run_info", broken)
    parser_handler = main(["--data-root", str(tmp_path), "data", "info"])
    line = one_line(parser_handler, capsys.readouterr().err)
    assert f"cannot read or write {tmp_path / 'x.h5'}: permission is denied" in line


SOAK_KILLS = 6


@pytest.mark.slow
def test_a_run_killed_at_random_moments_and_resumed_each_time_matches_an_uninterrupted_one(
    data_root: Path, tmp_path: Path
) -> None:
    """SIGKILL a real ``fewshot-sla run`` process at random moments, resume after each kill, and require the
    finished run to equal an uninterrupted one bit for bit (results, per-episode accuracies, checkpoints,
    metrics), with no temporary file or lock left."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    base = [sys.executable, "-m", "fewshot_sla", "--data-root", str(data_root), "run", *FLAGS, "--val-every", "2"]
    reference = tmp_path / "reference"
    start = time.perf_counter()
    subprocess.run([*base, "--out", str(reference)], env=env, check=True, capture_output=True)
    whole = time.perf_counter() - start
    out = tmp_path / "killed"
    rng = random.Random(20261201)
    kills = 0

    def command() -> list[str]:
        if (out / "results.json").is_file():
            shutil.rmtree(out)  # it finished (a kill came as it exited): run it again, to be killed elsewhere
        if (out / "config.yaml").is_file():
            return [*base, "--out", str(out), "--resume"]
        shutil.rmtree(out, ignore_errors=True)  # killed before its configuration was written: start afresh
        return [*base, "--out", str(out)]

    while kills < SOAK_KILLS:
        process = subprocess.Popen(command(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            process.wait(timeout=rng.uniform(0.3, 1.0) * whole)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            continue
        assert process.returncode == 0, process.stderr.read() if process.stderr else ""
    if not (out / "results.json").is_file():
        subprocess.run(command(), env=env, check=True, capture_output=True)
    assert_same_run(reference, out)
    assert temporaries(out) == [] and not lock_path(out).exists()
