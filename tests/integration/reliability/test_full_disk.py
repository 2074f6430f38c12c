"""A real file system filling up mid-write: every writer of the suite, run as the real CLI on a tiny tmpfs, ends
with one line naming the file and the full disk, exit code 2, no traceback or HDF5 noise, never a crash, and
leaves no temporary file and no partial output (a run folder is removed, or kept resumable and then resumed).

Each scenario runs in a private mount namespace (``unshare``): a small driver mounts the tmpfs, runs the steps
(commands, a remount to a larger size, a file filling the disk), lists what is left on the tmpfs and unmounts it in
a ``finally``; the namespace takes the mount with it even if the driver is killed. Where neither root nor user
namespaces are available (``unshare`` missing, or a container without the privilege), the tests are skipped.
The sizes are chosen so that the disk fills part of the way through the write (a store's first split fits by its
pixels but not with HDF5's metadata), or before it (the check of a split's size against the free space)."""

from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fewshot_sla.cli import main
from fewshot_sla.data import synthetic
from tests.helpers.paths import REPO
from tests.integration.cli.test_predict import TINY

RUN = TINY  # the tiny run of the predict tests
FULL = "no space is left on the device"

DRIVER = r"""
import json, os, subprocess, sys
from pathlib import Path

spec = json.loads(sys.argv[1])
disk = spec["disk"]
out = []
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + spec["size"], "tmpfs", disk], check=True)
try:
    for step in spec["steps"]:
        if "remount" in step:
            subprocess.run(["mount", "-o", "remount,size=" + step["remount"], disk], check=True)
            continue
        if "fill" in step:  # write zeros until the disk is full
            with open(os.path.join(disk, step["fill"]), "wb") as filler:
                try:
                    while True:
                        filler.write(bytes(1 << 16))
                        filler.flush()
                except OSError:
                    pass
            continue
        done = subprocess.run(
            step["run"], capture_output=True, text=True, cwd=spec["cwd"], env=spec["env"], timeout=300
        )
        left = {str(p.relative_to(disk)): p.stat().st_size for p in sorted(Path(disk).rglob("*")) if p.is_file()}
        out.append({"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr, "files": left})
finally:
    subprocess.run(["umount", disk], check=False)
print(json.dumps(out))
"""


@functools.cache
def _namespace() -> list[str] | None:
    """The command prefix that gives a private mount namespace where a tmpfs can be mounted, or None."""
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"fewshot-sla-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        candidates = [["unshare", "--mount"], ["unshare", "--map-root-user", "--mount"]]
        for prefix in candidates if shutil.which("unshare") else []:
            mount = f"mount -t tmpfs -o size=64k tmpfs {probe} && umount {probe}"
            if subprocess.run([*prefix, "sh", "-c", mount], capture_output=True).returncode == 0:
                return prefix
        return None
    finally:
        probe.rmdir()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """An empty folder to mount the tiny tmpfs on (skips where no tmpfs can be mounted)."""
    if _namespace() is None:
        pytest.skip("mounting a small tmpfs needs root or user namespaces ('unshare -rm'); neither works here")
    folder = tmp_path / "disk"
    folder.mkdir()
    return folder


def _step(step: list[str] | str | dict[str, str]) -> dict[str, Any]:
    if isinstance(step, dict):
        return step
    if isinstance(step, str):
        return {"remount": step}
    return {"run": [sys.executable, "-m", "fewshot_sla", *step]}


def on_tiny_disk(disk: Path, size: str, *steps: list[str] | str | dict[str, str]) -> list[dict[str, Any]]:
    """Mount a tmpfs of ``size`` on ``disk`` and run ``steps`` there: CLI argument lists (run as
    ``python -m fewshot_sla``), a size to remount the tmpfs with, or ``{"fill": NAME}`` (a file of zeros that fills
    the disk); for each command, its exit code, output and the files left on the tmpfs (relative path -> bytes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    plan = [_step(step) for step in steps]
    spec = {"disk": str(disk), "size": size, "steps": plan, "cwd": str(REPO), "env": env}
    prefix = _namespace()
    assert prefix is not None
    driver = [*prefix, sys.executable, "-c", DRIVER, json.dumps(spec)]
    done = subprocess.run(driver, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def full_disk_line(result: dict[str, Any], path: Path, note: str | None = None) -> str:
    """The one line of a command that met a full disk writing ``path`` (asserting everything else about it), after
    an expected ``note`` line if given."""
    err = result["stderr"]
    assert "Traceback" not in err and "Exception ignored" not in err and "HDF5" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    if note is not None:
        assert lines and lines[0].startswith(note), err
        lines = lines[1:]
    assert result["rc"] == 2 and len(lines) == 1, (result["rc"], err)
    line = lines[0]
    assert re.match(rf"fewshot-sla: error: cannot write (the \w+ )?{re.escape(str(path))}", line) and FULL in line, line
    assert "free some space (or write elsewhere)" in line, line
    assert not [name for name in result["files"] if name.endswith(".tmp")], result["files"]
    return line


# --- stores -------------------------------------------------------------------------------------------------------


def _train_bytes() -> int:
    """Pixels of the full synthetic set's train split (what the store's first split needs at least)."""
    size = synthetic.IMAGE_SIZE
    return synthetic.SPLIT_CLASSES["train"] * synthetic.IMAGES_PER_CLASS * size * size * 3


@pytest.mark.parametrize(
    "size, refused_at_once",
    [
        ("2m", True),  # the measured case: the train split alone is larger than the disk: refused before writing
        (f"{_train_bytes() // 1024 + 256}k", False),  # its pixels fit, the store does not: HDF5's writes fail
    ],
)
def test_preparing_the_synthetic_set_on_a_full_disk_is_one_line(disk: Path, size: str, refused_at_once: bool) -> None:
    [result] = on_tiny_disk(disk, size, ["--data-root", str(disk), "data", "prepare", "synthetic"])
    line = full_disk_line(result, disk / "synthetic.h5")
    assert (f"for its train split (it needs {_train_bytes() / (1 << 20):.1f} MB," in line) == refused_at_once, line
    assert result["files"] == {}  # no store, temporary file or lock


def test_a_disk_without_a_free_block_names_the_lock_file(disk: Path) -> None:
    [result] = on_tiny_disk(disk, "64k", {"fill": "filler"}, ["--data-root", str(disk), "data", "prepare", "synthetic"])
    err = result["stderr"].strip()
    assert result["rc"] == 2 and err.count("\n") == 0, err
    assert err == (
        f"fewshot-sla: error: cannot write the lock file {disk / '.synthetic.h5.lock'}: {FULL}; free some space "
        "(or write elsewhere), then run the command again"
    )
    assert list(result["files"]) == ["filler"]


def test_a_run_generating_the_synthetic_set_on_a_full_disk_is_one_line(disk: Path, tmp_path: Path) -> None:
    [result] = on_tiny_disk(disk, "2m", ["--data-root", str(disk), "run", *RUN, "--out", str(tmp_path / "run")])
    full_disk_line(result, disk / "synthetic.h5", note="fewshot-sla: generating the synthetic dataset into")
    assert result["files"] == {} and not (tmp_path / "run").exists()


def _image_folder(root: Path, classes: int = 10, per_class: int = 30) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("refused_at_once", [True, False])
def test_preparing_an_image_folder_on_a_full_disk_is_one_line(
    disk: Path, tmp_path: Path, refused_at_once: bool
) -> None:
    source = _image_folder(tmp_path / "images")  # 300 images; the seeded split gives 6 train classes: 180 images
    train = 180 * 32 * 32 * 3
    size = "256k" if refused_at_once else f"{train // 1024 + 8}k"  # + 8k: the lock file's page and a little more
    prepare = ["--data-root", str(disk), "data", "prepare", "mine", "--layout", "imagefolder", "--image-size", "32"]
    [result] = on_tiny_disk(disk, size, [*prepare, "--source", str(source)])
    line = full_disk_line(result, disk / "mine.h5")
    assert (f"for its train split (it needs {train / (1 << 20):.1f} MB," in line) == refused_at_once, line
    assert result["files"] == {}


# --- runs, episode sets, predictions, leaderboards ---------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny finished run on an ordinary disk: the sizes of what a run writes, and a run to predict with."""
    out = tmp_path_factory.mktemp("full-disk") / "run"
    with redirect_stdout(io.StringIO()):
        assert main(["--data-root", str(data_root), "run", *RUN, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_a_run_that_fills_the_disk_before_its_first_checkpoint_leaves_nothing(
    disk: Path, data_root: Path, finished: Path
) -> None:
    smallest = min(p.stat().st_size for p in (finished / "checkpoints").iterdir())
    out = disk / "runs" / "a"
    [result] = on_tiny_disk(
        disk, f"{smallest // 2 // 1024}k", ["--data-root", str(data_root), "run", *RUN, "--out", str(out)]
    )
    line = full_disk_line(result, out / "checkpoints")
    assert line.endswith("then run the command again (the new run folder was removed)"), line
    assert result["files"] == {}


@pytest.mark.slow
def test_a_run_that_fills_the_disk_later_stays_resumable_and_resumes(
    disk: Path, data_root: Path, finished: Path
) -> None:
    """The checkpoints fit, a later file does not: one line naming it with the --resume command, the folder kept
    without temporary files or a results.json; on a larger disk the resume finishes the run."""
    written = {p.relative_to(finished).as_posix(): p.stat().st_size for p in finished.rglob("*") if p.is_file()}
    checkpoints = sum(v for k, v in written.items() if k.startswith("checkpoints/"))
    out = disk / "run"
    run = ["--data-root", str(data_root), "run", *RUN, "--out", str(out)]
    size = f"{(checkpoints + (64 << 10)) // 1024}k"  # the checkpoints, config and metrics, and not much more
    first, resumed = on_tiny_disk(disk, size, run, "64m", [*run, "--resume"])
    err = first["stderr"].strip()
    assert first["rc"] == 2 and len(err.splitlines()) == 1 and FULL in err, err
    assert f"then continue with 'fewshot-sla run --resume --out {out}'" in err, err
    assert "Traceback" not in err and not [name for name in first["files"] if name.endswith(".tmp")]
    kept = {name.removeprefix("run/") for name in first["files"]}
    assert {"checkpoints/best.pt", "checkpoints/last.pt", "config.yaml"} <= kept and "results.json" not in kept
    assert resumed["rc"] == 0, resumed["stderr"]
    assert {name.removeprefix("run/") for name in resumed["files"]} == set(written)  # and no lock or temporary


def test_writing_an_episode_set_onto_a_full_disk_is_one_line(disk: Path, data_root: Path) -> None:
    out = disk / "sets" / "new" / "big.npz"  # about 260 KB
    make = ["--data-root", str(data_root), "episodes", "make", "--dataset", "synthetic", "--count", "2000"]
    [result] = on_tiny_disk(disk, "128k", [*make, "--out", str(out)])
    full_disk_line(result, out)
    assert result["files"] == {} and not (disk / "sets").exists()  # nor the folders made for it


@pytest.mark.slow
def test_writing_predictions_onto_a_full_disk_is_one_line(disk: Path, data_root: Path, finished: Path) -> None:
    rng = np.random.default_rng(1)
    folders = disk.parent / "images"
    for part, count in (("support", 2), ("query", 200)):
        for c in range(5):
            (folders / part / f"c{c}").mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(image).save(folders / part / f"c{c}" / f"image_{i:04d}.png")
    out = disk / "predictions" / "out.csv"  # 1,000 rows: about 100 KB
    predict = ["--data-root", str(data_root), "predict", str(finished), "--support", str(folders / "support")]
    [result] = on_tiny_disk(disk, "32k", [*predict, "--query", str(folders / "query"), "--out", str(out)])
    full_disk_line(result, out)
    assert result["files"] == {}


@pytest.mark.slow
def test_a_leaderboard_that_fills_the_disk_is_one_line(disk: Path, finished: Path) -> None:
    out = disk / "board"
    [result] = on_tiny_disk(disk, "24k", ["leaderboard", "build", str(finished.parent), "--out", str(out)])
    line = full_disk_line(result, out)
    written = line.removeprefix(f"fewshot-sla: error: cannot write {out}/").split(":")[0]
    assert written not in {Path(name).name for name in result["files"]}  # each file there is complete; not this one
