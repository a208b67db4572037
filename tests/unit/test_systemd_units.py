"""The shipped systemd units pass `systemd-analyze verify`, and the service keeps its hardening
(`systemd-analyze security` exposure, recorded in the README)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
APPPASS = Path(sys.executable).parent / "apppass"

# `systemd-analyze security` rates exposure from 0 (locked down) to 10; the README records 1.6.
MAX_EXPOSURE = 2.0


@pytest.fixture
def units(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (Debian package systemd)")
    for unit in UNITS.iterdir():
        # The units name the install path; verify checks that it is executable.
        text = unit.read_text().replace("/opt/apppass/bin/apppass", str(APPPASS))
        (tmp_path / unit.name).write_text(text)
    return tmp_path


def test_every_unit_verifies(units):
    files = sorted(str(p) for p in units.iterdir())
    assert len(files) == 5  # apppass, apppass-purge and apppass-notify (service and timer)
    result = subprocess.run(
        ["systemd-analyze", "verify", *files], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_service_stays_locked_down(units):
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(units / "apppass.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for apppass.service: ([0-9.]+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE
