"""The package works when installed from a wheel, not only from an editable checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_carries_the_data_the_code_reads(tmp_path):
    """`pip install .` then work from another folder: the LongBench protocol (package data) must come with the wheel."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("longctx-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    # from a folder outside the repository, with the installed copy first on the path (before the editable checkout)
    probe = (
        "import longctx, longctx.tasks.longbench.protocol as p; "
        "print(longctx.__file__); print(len(p.dataset_specs()), sorted(p.v2_protocol())[:1])"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    module_file, specs = result.stdout.splitlines()[:2]
    assert module_file.startswith(str(tmp_path / "site"))
    assert int(specs.split()[0]) > 21  # the 21 official datasets and the built-in suite
