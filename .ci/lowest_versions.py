"""The lowest versions pyproject.toml allows, as pip constraints (NAME==FLOOR, one per line), for every
dependency and the dev extra: `make test-lowest` installs them and runs the tests, so the floors
pyproject.toml states are versions a test run has shown to work. A dependency without a floor is an
error (its lowest version would be whatever pip finds)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
requirements = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
for requirement in requirements:
    found = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*([^;]*)", requirement)
    name, spec = found.group(1), found.group(3)
    floor = re.search(r">=\s*([0-9][^,\s]*)", spec)
    if floor is None:
        sys.exit(f"{name}: no lower bound in pyproject.toml ({requirement!r})")
    print(f"{name}=={floor.group(1)}")
