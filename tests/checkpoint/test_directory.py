"""DirectoryStorage: the layout on disk, the order of durable steps, crash leftovers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from taskkit.checkpoint import CheckpointStore, DirectoryStorage
from taskkit.checkpoint._storage import _HOST
from tests.checkpoint.conftest import SECRET


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"


def open_store(root: Path, run_id: str = "run-1", **options) -> CheckpointStore:
    return CheckpointStore(run_id, storage=DirectoryStorage(root), secret_key=SECRET, **options)


def test_one_directory_per_run_with_a_data_file_and_a_json_manifest(root):
    store = open_store(root)
    info = store.save({"w": np.arange(5)}, step=12, metrics={"loss": 0.5})
    run_dir = root / "run-1"
    assert sorted(os.listdir(run_dir)) == ["step-00000012.ckpt", "step-00000012.json"]
    data = (run_dir / "step-00000012.ckpt").read_bytes()
    manifest = json.loads((run_dir / "step-00000012.json").read_text())
    assert manifest == info.to_dict()
    assert manifest["size"] == len(data)
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert set(manifest) == {
        "run_id",
        "step",
        "size",
        "sha256",
        "format",
        "compression",
        "created_at",
        "python",
        "numpy",
        "sklearn",
        "metrics",
        "is_best",
        "signature",
    }
    assert store.storage.runs() == ["run-1"]


def test_data_is_made_durable_before_the_manifest_names_it(root, monkeypatch):
    store = open_store(root)
    store.save({"v": 0}, step=0)  # directories exist now
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", Path(src).name.split("~")[0], Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store.save({"w": np.ones(10)}, step=1)
    monkeypatch.undo()
    store.wait()
    simplified = [(e[0], e[1].split("~")[0], *e[2:]) for e in events]
    assert simplified == [
        ("fsync", ".step-00000001.ckpt"),  # the data temp file
        ("fsync", ".step-00000001.json"),  # the manifest temp file
        ("replace", ".step-00000001.ckpt", "step-00000001.ckpt"),
        ("fsync", "run-1"),  # the data's name is durable ...
        ("replace", ".step-00000001.json", "step-00000001.json"),  # ... before the manifest's
        ("fsync", "run-1"),
    ]


CRASHING_WRITER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from taskkit.checkpoint import CheckpointStore, DirectoryStorage

    root, crash_at = sys.argv[1], sys.argv[2]
    store = CheckpointStore("crashy", storage=DirectoryStorage(root), secret_key="{secret}")
    store.save({{"v": 1}}, step=1)
    real_replace = os.replace
    if crash_at == "data-fsync":
        os.fsync = lambda fd: os._exit(3)  # dies while the data is in its temp file
    else:
        def replace(src, dst):
            if str(dst).endswith(".json"):
                os._exit(3)  # dies between the data's rename and the manifest's
            real_replace(src, dst)
        os.replace = replace
    store.save({{"v": 2, "w": np.ones(100_000)}}, step=2)
    """
).format(secret=SECRET)


@pytest.mark.parametrize(
    ("crash_at", "left"),
    [
        ("data-fsync", [".step-00000002.ckpt"]),
        ("manifest-rename", [".step-00000002.json", "step-00000002.ckpt"]),
    ],
)
def test_what_a_crashed_write_leaves_is_removed_when_the_run_is_opened(
    root, tmp_path, crash_at, left
):
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_WRITER)
    result = subprocess.run(
        [sys.executable, str(script), str(root), crash_at],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 3, result.stderr
    run_dir = root / "crashy"
    complete = ["step-00000001.ckpt", "step-00000001.json"]
    names = sorted(os.listdir(run_dir))
    assert sorted(n.split("~")[0] for n in names) == sorted(complete + left)
    store = open_store(root, "crashy")
    assert sorted(os.listdir(run_dir)) == complete
    assert store.load_latest().state == {"v": 1}
    store.save({"v": 2}, step=2)
    assert store.load_latest().state == {"v": 2}


def temp_name(step: int, kind: str, pid: int, host: str = _HOST, token: str = "ab12") -> str:
    return f".step-{step:08d}.{kind}~{host}~{pid}~{token}.tmp"


def test_a_live_writers_files_are_left_alone(root):
    """A store opened (by a CLI, say) while a worker writes must not delete the worker's files."""
    run_dir = root / "run-1"
    run_dir.mkdir(parents=True)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # The worker is between its two renames: data in place, manifest still a temp file.
        files = [
            temp_name(3, "json", writer.pid),
            "step-00000003.ckpt",
            temp_name(4, "ckpt", writer.pid),
        ]
        for name in files:
            (run_dir / name).write_bytes(b"x")
        open_store(root)
        assert sorted(os.listdir(run_dir)) == sorted(files)
    finally:
        writer.kill()
        writer.wait()
    assert DirectoryStorage(root).remove_orphans("run-1") == 3
    assert os.listdir(run_dir) == []


def test_temp_files_of_this_process_and_of_other_hosts(root):
    run_dir = root / "run-1"
    run_dir.mkdir(parents=True)
    mine = temp_name(1, "ckpt", os.getpid())  # no write of this process has that token
    fresh_foreign = temp_name(2, "ckpt", 1, host="elsewhere")
    old_foreign = temp_name(3, "ckpt", 1, host="elsewhere")
    stray = "leftover.tmp"
    for name in (mine, fresh_foreign, old_foreign, stray):
        (run_dir / name).write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(run_dir / old_foreign, (two_hours_ago, two_hours_ago))
    assert DirectoryStorage(root).remove_orphans("run-1") == 3
    assert os.listdir(run_dir) == [fresh_foreign]  # its writer may still be at work


def test_a_failed_write_removes_its_temp_file_even_without_a_store(root, monkeypatch):
    storage = DirectoryStorage(root)
    (root / "run-1").mkdir(parents=True)

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        storage.write("run-1", 1, [b"data"], lambda: pytest.fail("no manifest for failed data"))
    monkeypatch.undo()
    assert os.listdir(root / "run-1") == []


def test_storage_methods_refuse_unsafe_run_ids(root):
    from taskkit.errors import InvalidRunId

    storage = DirectoryStorage(root)
    for call in (
        lambda: storage.infos("../x"),
        lambda: storage.read("/etc", 1),
        lambda: storage.delete("a/b", 1),
        lambda: storage.remove_orphans(".."),
    ):
        with pytest.raises(InvalidRunId):
            call()


def test_runs_lists_run_directories_only(root):
    (root / "not a run").mkdir(parents=True)
    (root / "file.txt").write_text("x")
    open_store(root, "b").save({}, step=0)
    open_store(root, "a").save({}, step=0)
    assert DirectoryStorage(root).runs() == ["a", "b"]
    assert DirectoryStorage(root / "missing").runs() == []


def test_a_data_file_is_read_into_one_writable_buffer(root):
    store = open_store(root)
    store.save({"w": np.arange(1000)}, step=0)
    data = store.storage.read("run-1", 0)
    assert not memoryview(data).readonly
    with pytest.raises(FileNotFoundError):
        store.storage.read("run-1", 1)
