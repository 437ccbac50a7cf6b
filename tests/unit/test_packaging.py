"""What an install carries: one version, and the GPL text setup.cfg's license names."""

from __future__ import annotations

import configparser
import importlib.metadata
from pathlib import Path

import pytest

import vmem_guest
from vmem_guest import cli

ROOT = Path(__file__).resolve().parents[2]


def test_installed_version_is_the_package_version() -> None:
    """setup.cfg reads vmem_guest.__version__, so the installed metadata says the same."""
    assert importlib.metadata.version("vmem-guest") == vmem_guest.__version__


def test_version_option_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["--version"])  # returns: click's exit 0, in non-standalone mode
    assert capsys.readouterr().out == f"vmem-guest, version {vmem_guest.__version__}\n"


def test_license_file_is_the_gpl_2_setup_cfg_names() -> None:
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "setup.cfg")
    assert config["metadata"]["license"] == "GPL-2.0-or-later"
    notice, title, gpl = (
        (ROOT / "LICENSE")
        .read_text(encoding="utf-8")
        .partition("GNU GENERAL PUBLIC LICENSE\n                       Version 2, June 1991")
    )
    assert title, "LICENSE does not hold the GPL version 2"
    assert "either version 2 of the License, or\n(at your option) any later version" in notice
    assert "END OF TERMS AND CONDITIONS" in gpl
