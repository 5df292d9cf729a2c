"""A service started without its extra says which one to install, instead of an ImportError trace.

The distribution installs nothing by default (the Airflow side needs only what Airflow ships); the agent
needs ``[agent]``, the sidecar ``[sidecar]``.
"""

from __future__ import annotations

import importlib.util
import sys


def require(extra: str, *modules: str, command: str) -> None:
    """Exit (status 1, one line on stderr) unless every module of ``extra`` can be imported."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(
            f"{command}: needs the [{extra}] extra, missing {', '.join(missing)}: "
            f"pip install 'agentic-airflow[{extra}]'"
        )
