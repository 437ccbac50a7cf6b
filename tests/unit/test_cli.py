"""The command line as a user meets it (issue 2, item 7 and the acceptance list).

The acceptance commands run through a real subprocess (``python -m
vmem_guest.cli``); the sweep of bad inputs and the help pages call
``vmem_guest.cli.main`` in-process, which is the console script's entry point.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import click
import pytest

from vmem_guest import cli, control, service
from vmem_guest.errors import TrackerLocked

MiB, GiB = 1 << 20, 1 << 30
REQUIRED_KEYS = {"requested", "plugged", "online", "usable", "remainder", "steps"}


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmem_guest.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def run_main(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Call the entry point; (exit status, stdout, stderr)."""
    try:
        cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:
        code = 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def json_lines(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines()]


def assert_one_line_error(code: int, out: str, err: str, status: int = 2) -> None:
    assert code == status, (code, out, err)
    assert "Traceback" not in err
    assert out == ""
    assert err.endswith("\n")
    assert err.count("\n") == 1, f"expected exactly one line on stderr, got:\n{err}"
    assert err.startswith("vmem-guest: error: ")


# --- acceptance ------------------------------------------------------------------------


def test_sim_sub_block_mode_with_remainder() -> None:
    proc = run_module(
        "sim",
        "--region",
        "4G",
        "--block-size",
        "2M",
        "--memory-block-size",
        "128M",
        "--resize",
        "1G,3G,1000M,0",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    steps = json_lines(proc.stdout)
    assert len(steps) == 4
    for step in steps:
        assert step.keys() >= REQUIRED_KEYS
        assert step["converged"] is True
        assert step["broken"] is False
    assert [s["requested"] for s in steps] == [GiB, 3 * GiB, 1000 * MiB, 0]
    # 1000M ends exactly: 7 whole blocks and 52 of the 8th block's 64 subblocks;
    # its 12 highest are holes (taken out of use, unplugged). At 0 the 8th block is
    # all holes and stays online: a block holding poisoned pages is never offlined.
    assert [s["plugged"] for s in steps] == [GiB, 3 * GiB, 1000 * MiB, 0]
    assert [s["online"] for s in steps] == [GiB, 3 * GiB, GiB, 128 * MiB]
    assert [s["holes"] for s in steps] == [0, 0, 24 * MiB, 128 * MiB]
    assert [s["remainder"] for s in steps] == [0, 0, 0, 0]
    # usable = min(region, requested + 256 MiB), and it only grows.
    assert [s["usable"] for s in steps] == [1280 * MiB, 3328 * MiB, 3328 * MiB, 3328 * MiB]


def test_sim_big_block_mode_converges_on_each_target() -> None:
    proc = run_module(
        "sim",
        "--block-size",
        "256M",
        "--memory-block-size",
        "128M",
        "--resize",
        "1G,256M,0",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    steps = json_lines(proc.stdout)
    assert [s["converged"] for s in steps] == [True, True, True]
    assert [s["plugged"] for s in steps] == [GiB, 256 * MiB, 0]
    assert [s["online"] for s in steps] == [GiB, 256 * MiB, 0]
    assert [s["remainder"] for s in steps] == [0, 0, 0]


def test_sim_converges_despite_busy_and_refused_offlines() -> None:
    args = (
        "sim",
        "--resize",
        "3G,0",
        "--busy-rate",
        "0.3",
        "--offline-fail-rate",
        "0.3",
        "--seed",
        "7",
        "--json",
    )
    proc = run_module(*args)
    assert proc.returncode == 0, proc.stderr
    steps = json_lines(proc.stdout)
    assert [s["converged"] for s in steps] == [True, True]
    assert [s["plugged"] for s in steps] == [3 * GiB, 0]
    retries = [s["retries"] for s in steps]
    assert all(isinstance(r, int) and r >= 0 for r in retries)
    assert sum(retries) > 0  # type: ignore[arg-type]
    # Same seed, same run: the faults are reproducible.
    again = run_module(*args)
    assert again.stdout == proc.stdout


def test_status_reports_what_the_sim_left(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    proc = run_module("sim", "--resize", "1G,1000M", "--state-dir", str(state_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    last = json_lines(proc.stdout)[-1]
    assert last["plugged"] == 1000 * MiB

    status = run_module("status", "--json", "--state-dir", str(state_dir))
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    assert (document["schema"], document["status"]) == (1, "ok")
    assert isinstance(document["guest"]["mem_total"], int)
    (device,) = document["devices"]
    assert device["plugged_size"] == last["plugged"]
    assert device["online_size"] == last["online"]
    assert device["requested_size"] == 1000 * MiB
    assert device["remainder"] == 0
    assert device["blocks"]["online"] == 8
    assert device["hole_bytes"] == 24 * MiB
    holed = device["holed_blocks"]
    assert [entry["subblocks"] for entry in holed] == ["#" * 52 + "." * 12]
    assert device["intent"] is None
    assert (device["converged"], device["not_converged"]) == (True, [])
    assert device["broken"] is False
    assert (device["interrupts"], device["device_features"]) == ("model", [])

    text = run_module("status", "--state-dir", str(state_dir))
    assert text.returncode == 0, text.stderr
    assert "plugged 1000MiB" in text.stdout
    assert "remainder 0" in text.stdout
    assert "model interrupts, features: none" in text.stdout
    assert "#######%...." in text.stdout
    assert "unplugged inside online blocks: 24MiB" in text.stdout
    assert f"memory{holed[0]['index']} {'#' * 52}{'.' * 12}" in text.stdout


def test_status_of_an_empty_state_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["status", "--json", "--state-dir", str(tmp_path)], capsys)
    assert (code, json.loads(out)["devices"]) == (0, [])
    code, out, _ = run_main(["status", "--state-dir", str(tmp_path)], capsys)
    assert code == 0
    assert "no virtio-mem device tracked" in out


def test_status_of_a_corrupt_tracker_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.state").write_bytes(b"\xde\xad" * 512)
    code, out, err = run_main(["status", "--state-dir", str(tmp_path)], capsys)
    assert_one_line_error(code, out, err, status=1)


def sim_tracker(state_dir: Path) -> Path:
    """A tracker file left by a short simulation in ``state_dir``."""
    proc = run_module("sim", "--resize", "256M", "--state-dir", str(state_dir))
    assert proc.returncode == 0, proc.stderr
    (path,) = state_dir.glob("*.state")
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="the agent distrusts such files only as root")
def test_status_of_a_world_writable_tracker_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit status 1, as for a corrupt file: nothing the user typed was wrong."""
    sim_tracker(tmp_path).chmod(0o666)
    code, out, err = run_main(["status", "--state-dir", str(tmp_path)], capsys)
    assert_one_line_error(code, out, err, status=1)
    assert "world-writable" in err


def test_status_of_a_tracker_under_another_name_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sim_tracker(tmp_path)
    path.rename(path.with_name("0000:00:1f.7.state"))
    code, out, err = run_main(["status", "--json", "--state-dir", str(tmp_path)], capsys)
    assert_one_line_error(code, out, err, status=1)
    assert "another device" in err


def test_second_agent_is_refused_before_touching_a_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_devices(devices: tuple[str, ...]) -> list[object]:
        raise AssertionError("a second agent looked for devices")

    monkeypatch.setattr(service, "select_devices", no_devices)
    server = control.ControlServer(
        control.socket_path(tmp_path),
        lambda req, emit: {"pid": 4242, "manual": False, "devices": ["0000:00:03.0"]},
        allowed_uids=frozenset({os.getuid()}),
    )
    thread = threading.Thread(target=server.serve_one)
    try:
        server.sock.setblocking(True)
        thread.start()
        code, out, err = run_main(["run", "--state-dir", str(tmp_path)], capsys)
        thread.join(10)
        assert control.socket_path(tmp_path).is_socket()  # the first agent's, untouched
    finally:
        server.close()
    assert_one_line_error(code, out, err)
    assert "already running (pid 4242, devices 0000:00:03.0)" in err


def test_agent_on_a_locked_tracker_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    @contextlib.contextmanager
    def locked(*args: object, **kwargs: object) -> Iterator[list[object]]:
        raise TrackerLocked("tracker x.state is locked by pid 77", holder_pid=77)
        yield []

    monkeypatch.setattr(service, "select_devices", lambda devices, **kwargs: [])
    monkeypatch.setattr(service, "attached_devices", locked)
    monkeypatch.setattr(service, "no_unevictable_compaction", contextlib.nullcontext)
    code, out, err = run_main(["run", "--state-dir", str(tmp_path)], capsys)
    assert_one_line_error(code, out, err)
    assert "locked by pid 77: another vmem-guest process owns the device" in err


def test_sim_table_without_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["sim", "--resize", "1G,1000M,0"], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["step", "requested", "plugged", "online", "usable", "remainder"]
    assert len(lines) == 4
    assert lines[0].split()[6] == "holes"
    assert lines[2].split()[:7] == ["2", "1000MiB", "1000MiB", "1GiB", "1280MiB", "0", "24MiB"]


# --- bad input: one line, exit 2 ---------------------------------------------------------


def test_resize_12q_through_the_module() -> None:
    proc = run_module("sim", "--resize", "12Q")
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr)
    assert "12Q" in proc.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["sim", "--resize", "12Q"],
        ["sim", "--resize", "1G", "--busy-rate", "2"],
        ["sim", "--resize", "1G", "--offline-fail-rate", "-0.1"],
        ["sim", "--resize", "1G", "--block-size", "3M"],
        ["sim", "--resize", "1G", "--block-size", "0"],
        ["sim", "--resize", "1G", "--memory-block-size", "3M"],
        ["sim", "--resize", "1G", "--region", "-1G"],
        ["sim", "--resize", "0", "--region", "0"],
        ["sim", "--resize", "1G", "--addr", "0x1"],
        ["sim", "--resize", "1G", "--addr", "0xfffffffffff00000"],
        ["sim", "--resize", ""],
        ["sim", "--resize", "1G,,2G"],
        ["sim", "--resize", "1.5G"],
        ["sim", "--resize", "5G"],  # above the 4 GiB region
        ["sim", "--resize", "3M"],  # not a multiple of the 2 MiB block
        ["sim", "--resize", "1" * 5000],
        ["sim", "--resize", "1G", "--seed", "x"],
        ["sim", "--resize", "1G", "--unknown-option"],
        ["sim"],  # --resize is required
        ["sim", "--resize", "1G", "--online-policy", "sideways"],
        ["no-such-command"],
        ["plug", "128M", "--device", "zz:zz.z"],
        ["plug", "128M", "--device", "0000:00:33.0"],  # device 0x33 > 0x1f
        ["state", "--addr", "0", "--blocks", "1", "--device", ""],
        ["fuzz", "--device", "0000:00:03.9"],
        ["fuzz", "--device-model", "bochs"],
        ["run", "--device", "00:03"],
    ],
    ids=lambda argv: " ".join(argv)[:40],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(argv, capsys)
    assert_one_line_error(code, out, err)


def test_device_reaches_the_agent_in_the_long_form(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent knows devices as 0000:00:03.0; 00:03.0 (or upper case) names the same."""
    requests: list[control.DeviceOperation] = []

    def manual_command(request: control.DeviceOperation, **kwargs: object) -> dict[str, object]:
        requests.append(request)
        return {"state": "PLUGGED"}

    monkeypatch.setattr(service, "manual_command", manual_command)
    code, out, err = run_main(
        ["state", "--addr", "0x100000000", "--blocks", "1", "--device", "00:03.0"], capsys
    )
    assert (code, out, err) == (0, "PLUGGED\n", "")
    code, _, _ = run_main(["unplug-all", "--device", "0000:00:0A.0"], capsys)
    assert [r.device for r in requests] == ["0000:00:03.0", "0000:00:0a.0"]


def test_state_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    for command in (["sim", "--resize", "0"], ["status"]):
        code, out, err = run_main([*command, "--state-dir", str(a_file)], capsys)
        assert_one_line_error(code, out, err)


def test_state_dir_that_cannot_be_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    code, out, err = run_main(["sim", "--resize", "0", "--state-dir", str(a_file / "sub")], capsys)
    assert_one_line_error(code, out, err, status=1)


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run_main([], capsys)
    assert code == 2
    assert "error" not in err
    assert "Commands:" in err
    assert "sim" in err and "status" in err


# --- help ----------------------------------------------------------------------------------


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    assert "virtio-mem" in out
    for name in cli.cli.commands:
        assert name in out


@pytest.mark.parametrize("name", sorted(cli.cli.commands))
def test_each_command_help_explains_its_options(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main([name, "--help"], capsys)
    assert (code, err) == (0, "")
    assert out.startswith(f"Usage: vmem-guest {name}")
    command = cli.cli.commands[name]
    assert command.help, f"{name} has no description"
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        assert param.help, f"{name} {param.opts[0]} has no help text"
        for opt in param.opts:
            assert opt in out


def test_sim_help_names_the_acceptance_options(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_main(["sim", "--help"], capsys)
    for option in (
        "--region",
        "--block-size",
        "--memory-block-size",
        "--resize",
        "--busy-rate",
        "--offline-fail-rate",
        "--seed",
        "--json",
        "--state-dir",
    ):
        assert option in out


def test_fuzz_device_model_runs_model_against_model(capsys: pytest.CaptureFixture[str]) -> None:
    """No device: qemu-7.2's and qemu-10.0's models differ in no fuzzed rule; BUSY for
    an empty UNPLUG_ALL is profile data (docs/device-profiles.md)."""
    # The fuzz extra; not on Debian 12's packages (make test-debian-packages), where the
    # command's one-line "pip install vmem-guest[fuzz]" refusal is what a user gets.
    pytest.importorskip("hypothesis")
    argv = ["fuzz", "--profile", "qemu-10.0", "--device-model", "qemu-7.2", "--examples", "5"]
    code, out, err = run_main([*argv, "--json"], capsys)
    assert (code, err) == (0, "")
    (report,) = json.loads(out)
    assert report["expected"] == report["found"] == []
    assert report["ok"] is True
    static = {row["field"]: row for row in report["static_differences"]}
    assert static["busy_unplug_all_when_empty"]["device_value"] == "True"
