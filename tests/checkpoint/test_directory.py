"""DirectoryStorage: the layout on disk, the order of durable steps, crash leftovers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import blake3
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
    assert manifest["blake3"] == blake3.blake3(data).hexdigest()
    assert set(manifest) == {
        "run_id",
        "step",
        "size",
        "blake3",
        "format",
        "compression",
        "created_at",
        "python",
        "numpy",
        "sklearn",
        "metrics",
        "is_best",
        "run_uid",
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
        # the temp files, with the dead writer's lock file (.step-00000002~host~pid~token.lock)
        ("data-fsync", [".step-00000002.ckpt", ".step-00000002"]),
        ("manifest-rename", [".step-00000002.json", "step-00000002.ckpt", ".step-00000002"]),
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


def lock_name(step: int, pid: int, host: str = _HOST, token: str = "ab12") -> str:
    return f".step-{step:08d}~{host}~{pid}~{token}.lock"


def test_temp_files_are_kept_exactly_while_their_writers_lock_is_held(root):
    """Whoever's names they carry (this process, another host), taskkit's temp files go once
    no one holds their writer's lock; a held lock keeps them, in this process too."""
    import fcntl

    run_dir = root / "run-1"
    run_dir.mkdir(parents=True)
    mine = temp_name(1, "ckpt", os.getpid(), token="aa")  # a finished write of this process
    foreign = temp_name(2, "ckpt", 1, host="elsewhere", token="bb")
    foreign_lock = lock_name(2, 1, host="elsewhere", token="bb")  # its writer died: lock free
    held = temp_name(3, "json", 1, host="elsewhere", token="cc")
    held_lock = lock_name(3, 1, host="elsewhere", token="cc")
    for name in (mine, foreign, foreign_lock, held, held_lock, "step-00000003.ckpt"):
        (run_dir / name).write_bytes(b"x")
    fd = os.open(run_dir / held_lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert DirectoryStorage(root).remove_orphans("run-1") == 3
        assert sorted(os.listdir(run_dir)) == sorted([held, held_lock, "step-00000003.ckpt"])
    finally:
        os.close(fd)
    assert DirectoryStorage(root).remove_orphans("run-1") == 3
    assert os.listdir(run_dir) == []


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


# -- storage hygiene (issue 14, item 5) ------------------------------------------------------


def test_opening_a_store_deletes_only_taskkits_own_temp_files(root):
    """Someone's ``model.tmp`` in a run folder is theirs: only taskkit's temp names may go."""
    run_dir = root / "run-1"
    run_dir.mkdir(parents=True)
    dead = temp_name(3, "ckpt", 1)  # a taskkit temp whose writer holds no lock: dead
    others = ["leftover.tmp", "model.tmp", ".step-00000001.ckpt.tmp"]
    for name in (dead, *others):
        (run_dir / name).write_bytes(b"x")
    open_store(root)
    assert sorted(os.listdir(run_dir)) == sorted(others)


def test_a_symlinked_run_folder_is_refused_and_its_target_left_alone(root, tmp_path):
    from taskkit.errors import CheckpointError

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / temp_name(3, "ckpt", 1)
    victim.write_bytes(b"precious")
    root.mkdir()
    (root / "run-1").symlink_to(elsewhere, target_is_directory=True)

    with pytest.raises(CheckpointError, match="symbolic link"):
        open_store(root)
    storage = DirectoryStorage(root)
    with pytest.raises(CheckpointError, match="symbolic link"):
        storage.write("run-1", 1, [b"data"], lambda: pytest.fail("no manifest"))
    with pytest.raises(CheckpointError, match="symbolic link"):
        storage.infos("run-1")
    assert os.listdir(elsewhere) == [victim.name]
    assert victim.read_bytes() == b"precious"
    assert storage.runs() == []  # a link is not a run


def test_a_symlinked_data_file_or_manifest_is_not_followed(root, tmp_path):
    import warnings

    from taskkit.errors import CheckpointCorrupt, CheckpointWarning

    store = open_store(root)
    store.save({"v": 1}, step=1)
    store.save({"v": 2}, step=2)
    run_dir = root / "run-1"
    # Step 2's data becomes a link to a file elsewhere (with the very same bytes).
    outside = tmp_path / "outside.ckpt"
    outside.write_bytes((run_dir / "step-00000002.ckpt").read_bytes())
    (run_dir / "step-00000002.ckpt").unlink()
    (run_dir / "step-00000002.ckpt").symlink_to(outside)
    with pytest.raises(CheckpointCorrupt, match="symbolic link"):
        store.load(2)
    with pytest.warns(CheckpointWarning, match="step 2 is unusable"):
        assert store.load_latest().state == {"v": 1}
    # A manifest that is a link is not read at all.
    outside_manifest = tmp_path / "outside.json"
    outside_manifest.write_bytes((run_dir / "step-00000001.json").read_bytes())
    (run_dir / "step-00000001.json").unlink()
    (run_dir / "step-00000001.json").symlink_to(outside_manifest)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = [info.step for info in store.list()]
    assert 1 not in steps
    assert any("symbolic link" in str(w.message) for w in caught)


def test_files_are_private_to_the_owner(root):
    store = open_store(root)
    store.save({"v": 1}, step=1)
    run_dir = root / "run-1"
    assert run_dir.stat().st_mode & 0o777 == 0o700
    assert root.stat().st_mode & 0o777 == 0o700
    for name in os.listdir(run_dir):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o600, name


def test_a_temp_file_named_after_a_live_pid_of_a_dead_writer_is_removed(root):
    """PIDs mean nothing across PID namespaces: pid 1 is alive here, the writer was not."""
    run_dir = root / "run-1"
    run_dir.mkdir(parents=True)
    (run_dir / temp_name(3, "ckpt", 1)).write_bytes(b"x")
    (run_dir / "step-00000003.ckpt").write_bytes(b"x")  # data between the two renames
    assert DirectoryStorage(root).remove_orphans("run-1") == 2
    assert os.listdir(run_dir) == []


BLOCKED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from taskkit.checkpoint import DirectoryStorage

    root, go = sys.argv[1], Path(sys.argv[2])
    # Another PID namespace (a container sharing the volume and the host name): the pid in the
    # temp names means nothing on this side.
    fake_pid = int(sys.argv[3])
    os.getpid = lambda: fake_pid
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json"):
            print("between renames", flush=True)
            while not go.exists():
                time.sleep(0.01)
        real_replace(src, dst)

    os.replace = replace
    from taskkit.checkpoint._info import CheckpointInfo
    info = CheckpointInfo(run_id="run-1", step=3, size=4, sha256="0" * 64)
    DirectoryStorage(root).write("run-1", 3, [b"data"], lambda: info)
    print("done", flush=True)
    """
)


def unused_pid() -> int:
    pid = 4_000_000
    while Path(f"/proc/{pid}").exists():
        pid -= 1
    return pid


def test_a_live_writer_in_another_pid_namespace_is_seen_alive_by_its_lock(root, tmp_path):
    """A store opened (by a CLI, in another container) while a worker writes must not delete
    the worker's files, whatever pid the worker's names carry; once it dies, they go."""
    script, go = tmp_path / "writer.py", tmp_path / "go"
    script.write_text(BLOCKED_WRITER)
    writer = subprocess.Popen(
        [sys.executable, str(script), str(root), str(go), str(unused_pid())],
        stdout=subprocess.PIPE,
        text=True,
    )
    run_dir = root / "run-1"
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "between renames\n"
        before = sorted(os.listdir(run_dir))
        assert "step-00000003.ckpt" in before
        assert any(n.startswith(".step-00000003.json~") for n in before)
        open_store(root)  # removes orphans: none, the writer lives
        assert sorted(os.listdir(run_dir)) == before
        writer.kill()
        writer.wait()
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert DirectoryStorage(root).remove_orphans("run-1") >= 2
    assert os.listdir(run_dir) == []


def test_a_live_writer_finishes_after_a_cleaner_looked(root, tmp_path):
    script, go = tmp_path / "writer.py", tmp_path / "go"
    script.write_text(BLOCKED_WRITER)
    writer = subprocess.Popen(
        [sys.executable, str(script), str(root), str(go), str(unused_pid())],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "between renames\n"
        assert DirectoryStorage(root).remove_orphans("run-1") == 0
        go.touch()
        assert writer.stdout.readline() == "done\n"
        assert writer.wait(30) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert sorted(os.listdir(root / "run-1")) == ["step-00000003.ckpt", "step-00000003.json"]


def test_a_checkpoint_folder_under_a_file_is_a_clear_error(tmp_path):
    from taskkit.errors import ConfigurationError

    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0\n")
    with pytest.raises(ConfigurationError, match=f"{a_file}.*not a directory"):
        DirectoryStorage(a_file / "ck")
    with pytest.raises(ConfigurationError, match="not a directory"):
        DirectoryStorage(a_file)
