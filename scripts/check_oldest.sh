#!/usr/bin/env bash
# The README's test command at the other end of the declared ranges: a virtual environment made fresh in
# a temporary folder with torch==2.13.0 (the README's) and every other dependency of `.[dev]` at the floor
# pyproject.toml declares for it (`>=X` installed as `==X`; what those depend on resolves as pip likes).
# The floors are read from pyproject.toml on each run, so that a raised floor is checked at once.
#
# Usage: scripts/check_oldest.sh [PYTEST_ARGS...]   (default: the whole suite, as the README runs it)
# Needs Python >= 3.11 (tomllib).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

python3 - >"$tmp/floors.txt" <<'PY'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["dev"]:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group()
    floor = re.search(r">=\s*([^,;\s]+)", requirement)
    if floor is None:
        raise SystemExit(f"pyproject.toml: {requirement!r} declares no floor (>=X); every dependency needs one")
    if name != "torch":  # the README's torch==2.13.0 (CPU wheel) is installed first, as command 2 does
        print(f"{name}=={floor.group(1)}")
PY
echo "floors from pyproject.toml:" $(cat "$tmp/floors.txt")

python3 -m venv "$tmp/venv"
# shellcheck disable=SC1091
. "$tmp/venv/bin/activate"
pip install -q "torch==2.13.0"
pip install -q -c "$tmp/floors.txt" -e ".[dev]"
pip list 2>/dev/null | grep -i -E "^($(cut -d= -f1 "$tmp/floors.txt" | paste -sd'|')|torch) "
python -m pytest -q "$@"
