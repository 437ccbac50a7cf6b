"""kernel_setting: a setting changed while serving comes back, even after a SIGKILL."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vmem_guest import kernel_setting
from vmem_guest.kernel_setting import SettingRecord, changed_setting, escaped_name, record_path

LOG = logging.getLogger("test.kernel_setting")
BOOT = "6a1d8c1e-0000-4000-8000-000000000001"


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(setting holding "1", state dir, boot_id file) under ``tmp_path``."""
    setting = tmp_path / "proc/sys/vm/compact_unevictable_allowed"
    setting.parent.mkdir(parents=True)
    setting.write_text("1\n")
    boot_id = tmp_path / "proc/sys/kernel/random/boot_id"
    boot_id.parent.mkdir(parents=True)
    boot_id.write_text(BOOT + "\n")
    return setting, tmp_path / "state", boot_id


def hold(setting: Path, state: Path, boot_id: Path) -> contextlib.AbstractContextManager[bool]:
    return changed_setting(setting, "0", state, LOG, boot_id_path=boot_id)


def leave_record(state: Path, setting: Path, original: str, boot: str | None = BOOT) -> Path:
    """What a process SIGKILLed while holding ``setting`` leaves behind."""
    state.mkdir(exist_ok=True)
    path = record_path(state, setting)
    path.write_text(SettingRecord(str(setting), original, "0", boot).to_json())
    return path


def test_changed_while_held_restored_after_and_record_gone(tree: tuple[Path, Path, Path]) -> None:
    setting, state, boot_id = tree
    with hold(setting, state, boot_id) as applied:
        assert applied
        assert setting.read_text() == "0"
        recorded = json.loads(record_path(state, setting).read_text())
        assert recorded == {"path": str(setting), "original": "1", "wanted": "0", "boot_id": BOOT}
    assert setting.read_text() == "1"
    assert not record_path(state, setting).exists()


def test_restored_when_the_block_raises(tree: tuple[Path, Path, Path]) -> None:
    setting, state, boot_id = tree
    with pytest.raises(RuntimeError), hold(setting, state, boot_id):
        raise RuntimeError("agent failed")
    assert setting.read_text() == "1"


def test_real_sigkill_then_next_start_restores_the_true_original(
    tree: tuple[Path, Path, Path],
) -> None:
    setting, state, boot_id = tree
    script = textwrap.dedent(
        f"""
        import logging, os, signal
        from pathlib import Path
        from vmem_guest.kernel_setting import changed_setting
        with changed_setting(Path({str(setting)!r}), "0", Path({str(state)!r}),
                             logging.getLogger(), boot_id_path=Path({str(boot_id)!r})):
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    child = subprocess.run([sys.executable, "-c", script], cwd=Path.cwd(), check=False)
    assert child.returncode == -signal.SIGKILL
    assert setting.read_text() == "0"  # the killed holder could not restore
    assert record_path(state, setting).exists()
    with hold(setting, state, boot_id) as applied:  # the next start
        assert applied and setting.read_text() == "0"
    assert setting.read_text() == "1"  # not the "0" it found
    assert not record_path(state, setting).exists()


def test_record_left_behind_gives_the_original_with_a_warning(
    tree: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    setting, state, boot_id = tree
    setting.write_text("0")
    leave_record(state, setting, "1")
    with hold(setting, state, boot_id):
        pass
    assert setting.read_text() == "1"
    assert "did not exit cleanly" in caplog.text


def test_a_value_set_by_hand_after_the_kill_is_the_original(
    tree: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    setting, state, boot_id = tree
    setting.write_text("2")  # an operator's, after the holder that wanted "0" died
    leave_record(state, setting, "1")
    with hold(setting, state, boot_id):
        assert setting.read_text() == "0"
    assert setting.read_text() == "2"
    assert "not the 0 a dead vmem-guest process set" in caplog.text


def test_record_of_an_earlier_boot_is_stale(tree: tuple[Path, Path, Path]) -> None:
    setting, state, boot_id = tree
    setting.write_text("2")  # what this boot's sysctl.conf set
    leave_record(state, setting, "1", boot="an earlier boot")
    with hold(setting, state, boot_id):
        assert json.loads(record_path(state, setting).read_text())["original"] == "2"
    assert setting.read_text() == "2"


@pytest.mark.parametrize(
    "text", ["{not json", "[]", '{"path": "x"}', '{"original": 1}', ""], ids=repr
)
def test_corrupt_record_warns_and_takes_the_current_value(
    tree: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture, text: str
) -> None:
    setting, state, boot_id = tree
    state.mkdir()
    record = record_path(state, setting)
    record.write_text(text)
    with hold(setting, state, boot_id):
        assert setting.read_text() == "0"
    assert setting.read_text() == "1"
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warning) == 1 and str(record) in warning[0] and "set the original by hand" in warning[0]
    )


def test_record_naming_another_setting_is_corrupt(
    tree: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    setting, state, boot_id = tree
    state.mkdir()
    record_path(state, setting).write_text(SettingRecord("/elsewhere", "7", "0", BOOT).to_json())
    with hold(setting, state, boot_id):
        pass
    assert setting.read_text() == "1"
    assert "it names /elsewhere" in caplog.text


def test_missing_setting_is_reported_not_fatal(
    tree: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _, state, boot_id = tree
    absent = state.parent / "sys/devices/system/memory/auto_online_blocks"
    with changed_setting(absent, "offline", state, LOG, boot_id_path=boot_id) as applied:
        assert not applied
    assert "does not exist" in caplog.text
    assert not absent.exists()
    assert not state.exists()  # nothing recorded


def test_unwritable_setting_is_reported_and_leaves_no_record(
    tree: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    setting, state, boot_id = tree

    monkeypatch.setattr(kernel_setting, "write_word", _refuse_write)
    with hold(setting, state, boot_id) as applied:
        assert not applied
    assert "cannot write 0" in caplog.text
    assert setting.read_text() == "1\n"
    assert not record_path(state, setting).exists()


def test_unwritable_after_a_kill_keeps_the_record(
    tree: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The value in place is the killed holder's: forgetting its original would keep it."""
    setting, state, boot_id = tree
    setting.write_text("0")
    leave_record(state, setting, "1")
    monkeypatch.setattr(kernel_setting, "write_word", _refuse_write)
    with hold(setting, state, boot_id) as applied:
        assert applied  # "0" was already in place
    # The restore failed too: the record stays for the next start.
    assert json.loads(record_path(state, setting).read_text())["original"] == "1"
    monkeypatch.undo()
    with hold(setting, state, boot_id):
        pass
    assert setting.read_text() == "1"


def _refuse_write(path: Path, word: str, *, truncate: bool = False) -> int:
    raise PermissionError(13, "Permission denied")


def test_state_dir_that_cannot_take_the_record_leaves_the_setting_alone(
    tree: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    setting, state, boot_id = tree
    state.mkdir()
    record = record_path(state, setting)
    (state / f".{record.name}.tmp-{os.getpid()}").mkdir()  # the temporary file cannot be made
    with hold(setting, state, boot_id) as applied:
        assert not applied
        assert setting.read_text() == "1\n"
    assert "cannot record the original 1" in caplog.text
    assert setting.read_text() == "1\n"


def test_the_last_of_two_holders_restores(tree: tuple[Path, Path, Path]) -> None:
    setting, state, boot_id = tree
    first = hold(setting, state, boot_id)
    second = hold(setting, state, boot_id)
    assert first.__enter__()
    assert second.__enter__()
    first.__exit__(None, None, None)
    assert setting.read_text() == "0"  # the second still serves
    second.__exit__(None, None, None)
    assert setting.read_text() == "1"
    assert not record_path(state, setting).exists()


def test_a_holder_joining_keeps_the_first_ones_original(tree: tuple[Path, Path, Path]) -> None:
    setting, state, boot_id = tree
    with hold(setting, state, boot_id):
        with hold(setting, state, boot_id) as applied:
            assert applied
            assert json.loads(record_path(state, setting).read_text())["original"] == "1"
        assert setting.read_text() == "0"
    assert setting.read_text() == "1"


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/proc/sys/vm/compact_unevictable_allowed", "proc-sys-vm-compact_unevictable_allowed"),
        (
            "/sys/devices/system/memory/auto_online_blocks",
            "sys-devices-system-memory-auto_online_blocks",
        ),
        ("/a-b/c", "a\\x2db-c"),
        ("/a/b/c", "a-b-c"),
        ("/.x/y.z", "\\x2ex-y.z"),
        ("/", "-"),
    ],
)
def test_escaped_name(path: str, name: str) -> None:
    assert escaped_name(Path(path)) == name


def test_a_holder_restoring_while_another_starts_is_not_taken_for_the_original(
    tree: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """B reads "0" while A holds it; A restores "1" before B gets the lock: B's
    original must be "1", read under the lock, not the "0" it saw first."""
    setting, state, boot_id = tree
    first = hold(setting, state, boot_id)
    assert first.__enter__()
    real_hold = kernel_setting._hold

    def first_leaves_meanwhile(lock: Path, record: Path) -> tuple[int, bool]:
        first.__exit__(None, None, None)
        assert setting.read_text() == "1"
        return real_hold(lock, record)

    monkeypatch.setattr(kernel_setting, "_hold", first_leaves_meanwhile)
    with hold(setting, state, boot_id) as applied:
        assert applied and setting.read_text() == "0"
        assert json.loads(record_path(state, setting).read_text())["original"] == "1"
    assert setting.read_text() == "1"
