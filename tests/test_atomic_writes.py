"""A full disk, a read-only folder or a kill -9 in the middle of a write never leaves a partial file: the target
keeps its previous content, the temporary is removed (or, after a kill, by the next write), and the user reads
one line naming the target and what to do."""

import errno
import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError

from tests.conftest import REPO
from tests.corpus import latents_cached, snapshot
from yem import atomic
from yem.data import cache
from yem.errors import CacheError, DataError, WriteError

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_then(error: BaseException):
    """A writer that writes half a file, then fails the way a full disk makes it fail."""
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 5000)
        raise error
    return write


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("error", [FULL, SafetensorError("Error while serializing: I/O error: No space left on "
                                                         "device (os error 28)")])
def test_a_full_disk_mid_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path, error):
    target = tmp_path / "index.json"
    atomic.write_text(target, "old\n")
    with pytest.raises(WriteError) as caught:
        atomic.write_with(target, half_then(error))
    assert str(caught.value) == (f"{target}: cannot write it (no space left on the disk); any previous version is "
                                 f"unchanged. Free some disk space, then rerun.")
    assert target.read_text() == "old\n" and files(tmp_path) == ["index.json"]


def test_a_full_disk_while_caching_tensors(tmp_path, monkeypatch):
    target = tmp_path / "instance" / "dog.safetensors"
    cache.write_tensors(target, {"mean": torch.ones(4)})
    before = target.read_bytes()

    def save_file_on_a_full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 64)  # what got out before the disk filled up
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(cache, "save_file", save_file_on_a_full_disk)
    with pytest.raises(WriteError, match=f"^{target}: cannot write it \\(no space left on the disk\\)"):
        cache.write_tensors(target, {"mean": torch.zeros(4)})
    assert target.read_bytes() == before and files(target.parent) == ["dog.safetensors"]


def test_cache_files_cut_short_by_a_crash_elsewhere_are_refused_by_name(tmp_path):
    """A file copied or written by something other than yem can still be partial: reading it says so."""
    tensors, index = tmp_path / "dog.safetensors", tmp_path / "index.json"
    cache.write_tensors(tensors, {"mean": torch.ones(64)})
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(CacheError, match=f"^{tensors}: unreadable cache file .*Rebuild it: dvc repro -f <stage>.$"):
        cache.read_tensors(tensors)
    for garbage in (b'{"samples": {"a"', b"\xff\xfe\x00garbage"):
        index.write_bytes(garbage)
        with pytest.raises(CacheError, match=f"^{index}: corrupt .*Rebuild it: dvc repro -f.$"):
            cache.read_index(tmp_path)


def test_a_full_disk_while_building_a_folder_keeps_the_old_folder(tmp_path):
    target = tmp_path / "latents"
    with atomic.staged_dir(target) as staging:
        atomic.write_text(staging / "a.txt", "old a")
    with pytest.raises(WriteError, match=f"^{target}: cannot write it \\(no space left"):
        with atomic.staged_dir(target) as staging:
            atomic.write_text(staging / "a.txt", "new a")
            atomic.write_with(staging / "b.txt", half_then(FULL))
    assert files(tmp_path) == ["latents"] and files(target) == ["a.txt"] and (target / "a.txt").read_text() == "old a"


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 256 KiB file system (tmpfs), where Linux root may mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs Linux and root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("this container may not mount a tmpfs")
    yield mount
    gc.collect()  # a failed torch.save keeps its file open from the traceback's frames until collected
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_a_real_full_disk(tiny_disk):
    """safetensors (Rust), torch.save and plain writes on a disk that really fills up: same line, nothing left."""
    small, large = tiny_disk / "small.safetensors", tiny_disk / "large.safetensors"
    cache.write_tensors(small, {"x": torch.ones(8)})
    cache.write_tensors(large, {"x": torch.ones(8)})
    before = large.read_bytes()
    with pytest.raises(WriteError, match=f"^{large}: cannot write it \\(no space left on the disk\\)"):
        cache.write_tensors(large, {"x": torch.ones(1 << 18)})  # 1 MiB
    with pytest.raises(WriteError, match="no space left on the disk"):
        atomic.write_bytes(tiny_disk / "big.bin", b"\x00" * (1 << 20))
    with pytest.raises(WriteError, match="no space left on the disk"):  # torch.save loses the errno on the way
        atomic.write_with(tiny_disk / "checkpoint.pt", lambda tmp: torch.save({"x": torch.ones(1 << 18)}, tmp))
    assert large.read_bytes() == before and files(tiny_disk) == ["large.safetensors", "small.safetensors"]


def test_an_error_without_errno_on_a_full_disk_is_a_full_disk_but_a_yem_error_stays_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_nearly_full", lambda folder: True)
    torch_save_on_a_full_disk = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(WriteError, match="no space left on the disk"):
        atomic.write_with(tmp_path / "checkpoint.pt", half_then(torch_save_on_a_full_disk))
    with pytest.raises(DataError, match="^photo.jpg: changed"):
        with atomic.staged_dir(tmp_path / "latents"):
            raise DataError("photo.jpg: changed after preflight checked it. Rerun: dvc repro.")
    assert files(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes through permission bits: test_a_read_only_disk covers this as root")
def test_a_read_only_folder(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    atomic.write_text(folder / "a.json", "old")
    folder.chmod(0o555)
    try:
        with pytest.raises(WriteError) as caught:
            atomic.write_text(folder / "a.json", "new")
    finally:
        folder.chmod(0o755)
    assert str(caught.value) == (f"{folder / 'a.json'}: cannot write it (permission denied); any previous version is "
                                 f"unchanged. Make the folder writable (chmod u+w), then rerun.")
    assert (folder / "a.json").read_text() == "old" and files(folder) == ["a.json"]


@pytest.mark.parametrize("code, what", [(errno.EROFS, "the disk is read-only"), (errno.EACCES, "permission denied")])
def test_a_read_only_disk(tmp_path, monkeypatch, code, what):
    """Creating the temporary fails as it does on a read-only mount (or, for a non-root user, chmod a-w)."""
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(atomic.tempfile, "mkdtemp", refuse)
    with pytest.raises(WriteError, match=f"^{tmp_path / 'out'}: cannot write it \\({what}\\)"):
        atomic.write_text(tmp_path / "out", "new")
    with pytest.raises(WriteError, match=f"^{tmp_path / 'out'}: cannot write it \\({what}\\)"):
        with atomic.staged_dir(tmp_path / "out"):
            pass
    assert files(tmp_path) == []


KILLED_WRITER = """
import sys, time
from pathlib import Path
from yem import atomic

target = Path(sys.argv[1])

def write_slowly(tmp):
    with open(tmp, "wb") as f:
        f.write(b"partial" * 1000)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)  # killed here

if sys.argv[2] == "file":
    atomic.write_with(target, write_slowly)
else:
    with atomic.staged_dir(target) as staging:
        write_slowly(staging / "half.bin")
"""


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_kill_9_mid_write_keeps_the_old_target_and_the_next_write_cleans_up(tmp_path, kind):
    target = tmp_path / "target"
    if kind == "file":
        atomic.write_text(target, "old")
    else:
        with atomic.staged_dir(target) as staging:
            atomic.write_text(staging / "a.txt", "old")
    before = snapshot(tmp_path)
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), kind], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    writer.stdout.close()
    leftovers = [name for name in files(tmp_path) if name != "target"]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".target.{writer.pid}.")  # hidden, named by its writer
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(".")} == before
    if kind == "file":
        atomic.write_text(target, "new")
    else:
        with atomic.staged_dir(target) as staging:
            atomic.write_text(staging / "a.txt", "new")
    assert files(tmp_path) == ["target"]


def test_temporaries_of_a_running_writer_are_left_alone(tmp_path):
    alive = tmp_path / f".target.{os.getppid()}.abc123.tmp"  # the parent process: certainly running
    alive.write_text("in progress")
    atomic.write_text(tmp_path / "target", "x")
    assert alive.exists()


def test_a_stage_meeting_a_full_disk_keeps_its_previous_cache(tmp_path, tiny_model_dir, monkeypatch):
    from stages.latents import main

    project, args, before = latents_cached(tmp_path / "project")
    real_save, calls = cache.save_file, []

    def fills_up_on_the_second_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(cache, "save_file", fills_up_on_the_second_file)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1] == (f"Error: {project / 'build/latents'}: cannot write it (no space left on "
                                              f"the disk); any previous version is unchanged. Free some disk space, "
                                              f"then rerun.")
    assert snapshot(project / "build") == before
    assert files(project / "build") == ["captions.json", "images.json", "latents", "preflight.json"]


def test_a_yem_error_outside_reported_is_still_one_line_and_exit_1():
    """stages/__init__.py: writing an output after the stage's `reported()` block may fail too."""
    code = "import stages; from yem.errors import WriteError; raise WriteError('build/x.json: cannot write it. Fix.')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == "Error: build/x.json: cannot write it. Fix.\n"


@pytest.mark.parametrize(("umask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                                (0o002, 0o664, 0o775)])
def test_outputs_get_the_permissions_the_umask_gives(tmp_path, umask, file_mode, folder_mode):
    """They were 0600 and 0700 whatever the umask (mkstemp, mkdtemp, safetensors): a LoRA or a card meant to be
    served or shared was unreadable to everyone else."""
    from safetensors.torch import save_file

    previous = os.umask(umask)
    try:
        atomic.write_text(tmp_path / "card.md", "# card\n")
        atomic.write_with(tmp_path / "lora.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp)))
        with atomic.staged_dir(tmp_path / "dist") as staging:
            (staging / "images").mkdir()
            save_file({"w": torch.zeros(2)}, str(staging / "images" / "lora.safetensors"))
    finally:
        os.umask(previous)
    for path in (tmp_path / "card.md", tmp_path / "lora.safetensors", tmp_path / "dist/images/lora.safetensors"):
        assert path.stat().st_mode & 0o777 == file_mode, path
    for path in (tmp_path / "dist", tmp_path / "dist/images"):
        assert path.stat().st_mode & 0o777 == folder_mode, path
