# Sourced by the scripts: create or reuse .venv with the project and its dev tools installed, at exactly
# the versions locks/dev.txt records (scripts/lock refreshes it). Reinstalls when pyproject.toml or the
# lock changes; concurrent callers wait for one install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
lock="$root/locks/dev.txt"
# What the install depends on: the lock, and pyproject.toml's [project] and [build-system] (not the
# tools' settings, whose edits must not rebuild a venv other runs are using).
installs_from() {
    "${PYTHON:-python3.11}" -c 'import json, sys, tomllib
doc = tomllib.load(open(sys.argv[1], "rb"))
print(json.dumps([doc["project"], doc["build-system"]], sort_keys=True))' "$root/pyproject.toml"
    cat "$lock"
}
stamp="$venv/.installed-$(installs_from | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    exec 9>"$root/.venv.lock"
    flock 9
fi
if [ ! -f "$stamp" ]; then
    echo "setting up $venv from locks/dev.txt (first run only, about a minute)" >&2
    log="$(mktemp)"
    if ! { "${PYTHON:-python3.11}" -m venv --clear "$venv" \
           && "$venv/bin/pip" install -U pip setuptools wheel -c "$lock" \
           && "$venv/bin/pip" install -c "$lock" --build-constraint "$lock" -e "$root[dev]" \
           && (cd "$root" && "$venv/bin/python" -m harness.locks --check); } >"$log" 2>&1; then
        cat "$log" >&2
        echo "could not set up $venv (full log above; a lock that no longer covers pyproject.toml: scripts/lock --dev)" >&2
        exit 1
    fi
    rm -f "$log" "$venv"/.installed-*
    touch "$stamp"
fi
exec 9>&-  # the install is done: the tests or the demo that follow must not hold the lock
export PATH="$venv/bin:$PATH"
