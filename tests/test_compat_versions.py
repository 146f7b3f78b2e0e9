"""The contract tests on the lowest versions pyproject.toml allows.

Builds (once, then reuses) a virtualenv on top of this interpreter's packages with the
lower bound of each library hub reaches into (hub/_compat; redis-py for the cluster and
Sentinel code), installed from the package index, and runs tests/test_compat.py there.
The newest allowed versions are the ones the rest of the suite runs on.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.version import Version

from tests.conftest import ROOT

SEAM = ("python-socketio", "python-engineio", "uvicorn", "redis")


def lower_bounds() -> dict[str, str]:
    """The ``>=`` bound of each seam library in pyproject's dependencies."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {}
    for dep in deps:
        match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)$", dep)
        assert match is not None, dep
        name, extras, spec = match.groups()
        if name in SEAM:
            lower = re.search(r">=\s*([0-9][^,\s]*)", spec)
            assert lower is not None, f"{dep}: a seam library needs a lower bound"
            bounds[name + (extras or "")] = lower.group(1)
    assert len(bounds) == len(SEAM), bounds
    return bounds


def test_every_seam_library_has_an_upper_bound_too() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        if dep.split("[")[0].split(">")[0].strip() in SEAM:
            assert "<" in dep, f"{dep}: untested future releases must not be allowed"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_contract_tests_pass_on_the_lowest_allowed_versions(tmp_path: Path) -> None:
    bounds = lower_bounds()
    pins = [f"{name}=={version}" for name, version in sorted(bounds.items())]
    key = hashlib.sha256(f"{sys.version}{pins}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    env_dir = cache / "hub-compat-venvs" / key
    python = env_dir / "bin" / "python"
    if not (env_dir / "ready").exists():
        venv.create(env_dir, system_site_packages=True, with_pip=True, clear=True)
        installed = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             *pins], capture_output=True, text=True, timeout=500)
        assert installed.returncode == 0, installed.stderr[-3000:]
        (env_dir / "ready").write_text("\n".join(pins))
    versions = subprocess.run(
        [str(python), "-c", "from importlib.metadata import version as v; "
         f"print(' '.join(v(n) for n in {list(SEAM)!r}))"],
        capture_output=True, text=True, check=True).stdout.split()
    wanted = [next(v for k, v in bounds.items() if k.split("[")[0] == n) for n in SEAM]
    assert [Version(v) for v in versions] == [Version(v) for v in wanted], versions
    result = subprocess.run(
        [str(python), "-m", "pytest", "tests/test_compat.py", "-q", "-p", "no:cacheprovider",
         "-p", "no:cov", "-x"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, (
        f"contract tests fail on {', '.join(pins)}:\n{result.stdout[-4000:]}")
