"""pyproject.toml: no torch pin, floors that have the APIs the code calls, no dead extras."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _deps() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for d in project["dependencies"]:
        m = re.match(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?(.*)", d)
        out[m.group(1).lower()] = m.group(3).strip()
    return out


def test_torch_is_a_range_and_the_setup_installs_the_cpu_wheel_first():
    deps = _deps()
    assert "==" not in deps["torch"] and deps["torch"].startswith(">=")
    readme = (ROOT / "README.md").read_text()
    setup = next(line for line in readme.splitlines() if "pip install -e" in line and "torch==" in line)
    assert setup.index("pip install torch==") < setup.index("pip install -e")
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme


def test_floors_have_the_zarr3_api_the_cube_uses():
    deps = _deps()
    assert re.fullmatch(r">=\s*3(\.\d+)*", deps["zarr"]), deps["zarr"]
    assert tuple(int(x) for x in deps["xarray"].lstrip(">=").split(".")[:2]) >= (2024, 10)


def test_no_unused_extras():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "baseline" not in extras
