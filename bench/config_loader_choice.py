"""Why both services load their configuration with servicekit.config, not pydantic-settings.

    python -m bench.config_loader_choice      # ~1 min: makes a throwaway venv with pydantic-settings

The agent runs on every VM and starts on every boot: what a loader costs there is its import time
and what it adds to the install. Both are measured: a fresh interpreter importing each loader
(median of 9 starts, minus a bare interpreter's start), and the bytes pydantic-settings and the
packages it pulls in occupy in site-packages.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTS = 9


def start_time(python: Path, code: str) -> float:
    samples = []
    for _ in range(STARTS):
        started = time.perf_counter()
        subprocess.run([str(python), "-c", code], check=True)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def size(paths: list[Path]) -> int:
    return sum(f.stat().st_size for path in paths for f in path.rglob("*") if f.is_file())


def main() -> int:
    ours = Path(sys.executable)
    with tempfile.TemporaryDirectory(prefix="bench-config-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = venv / "bin" / "python"
        before = {p.name for p in next((venv / "lib").glob("python3.*/site-packages")).iterdir()}
        subprocess.run([str(python), "-m", "pip", "install", "-q", "pydantic-settings"], check=True)
        site = next((venv / "lib").glob("python3.*/site-packages"))
        added = [p for p in site.iterdir() if p.name not in before]
        versions = subprocess.run(
            [
                str(python),
                "-c",
                "import pydantic, pydantic_settings as s; print(pydantic.VERSION, s.__version__)",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        bare_theirs = start_time(python, "pass")
        theirs = start_time(python, "import pydantic_settings") - bare_theirs
        bare_ours = start_time(ours, "pass")
        mine = start_time(ours, "import servicekit.config, servicekit.credentials") - bare_ours
        print(
            "| loader | import time (ms, median of 9 starts, bare start subtracted) | added to the install |"
        )
        print("|---|---|---|")
        print(
            f"| pydantic-settings {versions[1]} (pydantic {versions[0]}) | {theirs:.0f} | "
            f"{size(added) / 2**20:.1f} MiB ({len(added)} entries in site-packages) |"
        )
        print(f"| servicekit.config + servicekit.credentials | {mine:.0f} | 0 (part of this package) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
