"""The lowest direct versions: every lower bound of pyproject.toml (dependencies and the test and lowmem extras) as
a pip constraints file on stdout, `name==floor`, markers kept. pip then resolves everything else to its newest
compatible version, as `uv pip install --resolution lowest-direct` does. torch is left out: CI installs the CPU
build the Makefile pins (older Linux torch wheels on PyPI pull gigabytes of CUDA libraries), so its floor is held
to what the dependencies themselves ask of torch instead.

A requirement without a `>=` floor stops the script with one line: an unbounded dependency has no floor to test.
"""

import re
import sys
import tomllib
from pathlib import Path

EXTRAS = ("test", "lowmem")
UNPINNED = {"torch"}
REQUIREMENT = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*(?P<floor>[^,;\s]+)\s*(?P<marker>;.*)?$")


def constraints(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    wanted = project["dependencies"] + [r for extra in EXTRAS for r in project["optional-dependencies"][extra]]
    lines = []
    for requirement in wanted:
        match = REQUIREMENT.match(requirement)
        if match is None:
            raise SystemExit(f"{pyproject}: {requirement!r} has no floor of the form name>=version (got no "
                             f"lower bound). Give it the lowest version the suite passes with.")
        if match["name"].lower() not in UNPINNED:
            lines.append(f"{match['name']}=={match['floor']}{match['marker'] or ''}")
    return lines


if __name__ == "__main__":
    print("\n".join(constraints(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))))
