# Sourced by the scripts: create or reuse .venv with the project and its dev tools installed.
# Reinstalls only when pyproject.toml changes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.installed-$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setting up $venv (first run only, about a minute)" >&2
    log="$(mktemp)"
    if ! { "${PYTHON:-python3.11}" -m venv "$venv" \
           && "$venv/bin/pip" install -U pip \
           && "$venv/bin/pip" install -e "$root[dev]"; } >"$log" 2>&1; then
        cat "$log" >&2
        echo "could not set up $venv (full log above)" >&2
        exit 1
    fi
    rm -f "$log" "$venv"/.installed-*
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
