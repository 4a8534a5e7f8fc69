"""The native-kernel cache against a hostile user: planted libraries are never loaded, folders
that others can write to (or that others own) are refused, and the normal cache still works.

A planted library here is a real shared object whose constructor writes a marker file, so
"not loaded" means its code did not run in this process."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from difflab.networks import native
from difflab.networks.native import cache

# every test compiles the kernels (about a second each)
pytestmark = pytest.mark.slow

OTHER_UID = 65534  # nobody


@pytest.fixture
def fresh(monkeypatch):
    """library() forgets the kernels loaded so far (restored afterwards)."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.delenv("DIFFLAB_NATIVE", raising=False)


def _library_name() -> str:
    return f"gn_act-{native._build_key(native._compiler())}.so"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plant(folder: Path, marker: Path, forged_record: str | None) -> Path:
    """Compile a library that writes ``marker`` when loaded, under the name the kernels would
    have, with ``forged_record`` as its SHA-256 record ("match": its true digest)."""
    src = folder.parent / f"planted-{folder.name}.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void)'
                   f' {{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    target = folder / _library_name()
    subprocess.run([native._compiler(), "-shared", "-fPIC", str(src), "-o", str(target)],
                   check=True, timeout=120)
    if forged_record is not None:
        digest = _sha256(target) if forged_record == "match" else forged_record
        cache.digest_path(target).write_text(digest + "\n")
    return target


def _assert_real_kernels_loaded(marker: Path) -> Path:
    lib = native.library()
    assert lib is not None and hasattr(lib, "gn_act_forward")
    assert not marker.exists(), "the planted library's code ran"
    path = native.library_path()
    assert cache.digest_path(path).read_text().strip() == _sha256(path)
    return path


@pytest.mark.parametrize("forged_record", ["wrong", None])
def test_planted_library_is_rebuilt_not_loaded(tmp_path, monkeypatch, fresh, forged_record):
    """A library whose bytes do not match the record (or has none) is replaced by a fresh
    build before anything loads it."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DIFFLAB_NATIVE_CACHE", str(folder))
    good = native.build()
    record = cache.digest_path(good).read_text().strip()
    marker = tmp_path / "planted-code-ran"
    cache.digest_path(good).unlink()
    _plant(folder, marker, record if forged_record == "wrong" else None)
    assert _sha256(good) != record  # the planted bytes are in place
    assert _assert_real_kernels_loaded(marker) == good
    assert _sha256(good) == record  # rebuilt: the same bytes as the first build


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777, 0o722])
def test_folder_writable_by_others_is_refused(tmp_path, monkeypatch, fresh, mode):
    folder = tmp_path / "shared"
    folder.mkdir()
    marker = tmp_path / "planted-code-ran"
    _plant(folder, marker, "match")  # the other user records a matching digest too
    folder.chmod(mode)
    before = sorted(p.name for p in folder.iterdir())
    monkeypatch.setenv("DIFFLAB_NATIVE_CACHE", str(folder))
    with pytest.warns(RuntimeWarning, match="refused: writable by group or others"):
        path = _assert_real_kernels_loaded(marker)
    assert path.parent != folder and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing built there
    with pytest.raises(RuntimeError, match=f"{folder} refused: writable by group"):
        native.build(folder)  # an explicit folder is refused outright


def _owned_by_other_user(folder: Path, monkeypatch) -> None:
    """Give ``folder`` to uid 65534: really when running as root, else by making os.stat
    report that owner for this one path."""
    if os.geteuid() == 0:
        os.chown(folder, OTHER_UID, OTHER_UID)
        return
    real_stat = os.stat

    def fake_stat(path, *args, **kwargs):
        st = real_stat(path, *args, **kwargs)
        if Path(path) == folder:
            fields = list(st[:10])
            fields[stat.ST_UID] = OTHER_UID
            return os.stat_result(fields)
        return st

    monkeypatch.setattr(os, "stat", fake_stat)


def test_folder_owned_by_another_user_is_refused(tmp_path, monkeypatch, fresh):
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o755)
    marker = tmp_path / "planted-code-ran"
    _plant(folder, marker, "match")
    _owned_by_other_user(folder, monkeypatch)
    assert cache.refusal(folder) == f"owned by uid {OTHER_UID}, not {os.getuid()}"
    monkeypatch.setenv("DIFFLAB_NATIVE_CACHE", str(folder))
    with pytest.warns(RuntimeWarning, match=f"refused: owned by uid {OTHER_UID}"):
        path = _assert_real_kernels_loaded(marker)
    assert path.parent != folder


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another uid")
def test_library_owned_by_another_user_is_rebuilt(tmp_path, monkeypatch, fresh):
    """In a private folder, a library and record that another uid owns (left from when the
    folder was not private, say) are not trusted even with a matching digest."""
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    marker = tmp_path / "planted-code-ran"
    target = _plant(folder, marker, "match")
    for path in (target, cache.digest_path(target)):
        os.chown(path, OTHER_UID, OTHER_UID)
    monkeypatch.setenv("DIFFLAB_NATIVE_CACHE", str(folder))
    assert _assert_real_kernels_loaded(marker) == target
    assert target.stat().st_uid == os.getuid()


def test_predictable_temporary_folder_is_not_used(tmp_path, monkeypatch, fresh):
    """The old fallback, $TMPDIR/difflab-native-<uid>, could be made in advance by anyone:
    with a library planted there, an unusable cache folder must not lead to it."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    trap = tmp / f"difflab-native-{os.getuid()}"
    trap.mkdir()
    marker = tmp_path / "planted-code-ran"
    _plant(trap, marker, "match")
    trap.chmod(0o777)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DIFFLAB_NATIVE_CACHE", str(blocker / "native"))
    with pytest.warns(RuntimeWarning, match="native kernel cache not used"):
        path = _assert_real_kernels_loaded(marker)
    assert path.parent.parent == tmp and path.parent != trap


def test_library_changed_after_the_check_is_not_loaded(tmp_path, monkeypatch, fresh):
    """_load hashes the open descriptor it hands to the loader, not the name: a library
    swapped in after build() returned is refused."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DIFFLAB_NATIVE_CACHE", str(folder))
    marker = tmp_path / "planted-code-ran"
    real_build = native.build

    def build_then_swap(out_dir=None):
        path = real_build(out_dir)
        record = cache.digest_path(path).read_text()
        _plant(folder, marker, None)
        cache.digest_path(path).write_text(record)
        return path

    monkeypatch.setattr(native, "build", build_then_swap)
    with pytest.warns(RuntimeWarning, match="does not match its recorded SHA-256"):
        assert native.library() is None
    assert not marker.exists()


def test_new_cache_folder_is_private_and_reused(tmp_path, monkeypatch, fresh):
    folder = tmp_path / "deep" / "cache"
    monkeypatch.setenv("DIFFLAB_NATIVE_CACHE", str(folder))
    first = native.build()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and cache.refusal(folder) is None
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert sorted(stamps) == [first.name, first.name + ".sha256"]  # no temporary left
    assert native.library() is not None and native.library_path() == first
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # reused
