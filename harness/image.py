"""The container image (``Dockerfile``), built and run with podman the way a machine without an image
registry can (``scripts/image``; tests/test_image.py runs what it builds).

- The base: no registry can be reached, so ``python:3.11-slim-bookworm`` cannot be pulled. Debian
  bookworm's own Python 3.11 stands in for it, bootstrapped from Debian's packages by mmdebstrap and
  ``podman import``-ed, with the apt and dpkg settings of Debian's slim images. Made once per machine
  (the tarball is kept under ``$AGENTIC_CACHE/image/``, default ``~/.cache/agentic-airflow``).
- Python packages: pip inside a build cannot verify the package index's certificate here, so the
  wheels are fetched outside (``pip wheel`` under ``locks/dev.txt``, into a wheelhouse cached by the
  lock's hash) and handed to the build as its ``wheels`` context with ``PIP_SOURCE=wheels``.
- podman runs with runc (crun refuses the hybrid cgroup hierarchy of these machines) and explicit
  ulimits (without them the runtime fails: "error setting rlimit type 7").

``scripts/ensure-tools image`` installs podman, runc and mmdebstrap from Debian.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "locks" / "dev.txt"
PODMAN = ("podman", "--runtime", "runc")
# Both `podman build` and `podman run` need them here: podman's default limits are refused
# ("error setting rlimit type 7: operation not permitted").
ULIMITS = ("--ulimit", "nofile=1024:20000", "--ulimit", "nproc=1024:1024")

BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
_CLEAN = "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin"
# What Debian's slim images (under python:3.11-slim) set, kept in the base for the Dockerfile's own
# apt-get: no package caches or translations are kept, no documentation, man pages or message
# catalogues are installed (licences are).
BASE_APT_OPTIONS = (
    'Dir::Cache::pkgcache ""',
    'Dir::Cache::srcpkgcache ""',
    'Acquire::Languages "none"',
    f'DPkg::Post-Invoke {{ "{_CLEAN} || true"; }}',
    f'APT::Update::Post-Invoke {{ "{_CLEAN} || true"; }}',
)
BASE_DPKG_OPTIONS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
)


class ImageError(RuntimeError):
    """A step failed: the message holds the command and the end of its output (no secret is ever on a
    command line: containers take theirs from the environment, by name)."""


def cache_dir() -> Path:
    return Path(os.environ.get("AGENTIC_CACHE", Path.home() / ".cache" / "agentic-airflow")) / "image"


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def default_tag() -> str:
    return f"localhost/agentic-airflow:{project_version()}"


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    log: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (bounded by ``timeout``); ``check``: a failure raises :class:`ImageError` with the
    end of its output. ``log``: the output goes there instead (a build's is long)."""
    try:
        if log is None:
            result = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=timeout, env=env, check=False
            )
        else:
            with log.open("w") as out:
                result = subprocess.run(
                    list(argv),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=timeout,
                    env=env,
                    check=False,
                )
            result.stdout = log.read_text(errors="replace")
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{shown(argv)}: no end within {timeout:g} s") from exc
    if check and result.returncode != 0:
        output = (result.stdout or "")[-4000:] + (result.stderr or "")[-4000:]
        raise ImageError(f"{shown(argv)} exited {result.returncode}:\n{output}")
    return result


def shown(argv: Sequence[str]) -> str:
    return " ".join(argv) if len(argv) < 12 else " ".join(argv[:12]) + " ..."


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([*PODMAN, *args], timeout=timeout, check=check)


@contextmanager
def locked(name: str) -> Iterator[None]:
    """One maker at a time of a cached thing (concurrent builds on one machine wait for it)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def missing_tools() -> list[str]:
    return [tool for tool in ("podman", "runc", "mmdebstrap") if shutil.which(tool) is None]


def require_tools() -> None:
    if missing := missing_tools():
        raise ImageError(
            f"{', '.join(missing)} not found: scripts/ensure-tools image installs them (as root)"
        )


# ------------------------------------------------------------------------------------------- base


def base_argv(output: Path) -> list[str]:
    return [
        "mmdebstrap",
        "--variant=minbase",
        f"--include={','.join(BASE_PACKAGES)}",
        *(f"--aptopt={option}" for option in BASE_APT_OPTIONS),
        *(f"--dpkgopt={option}" for option in BASE_DPKG_OPTIONS),
        BASE_SUITE,
        str(output),
    ]


def base_image() -> str:
    """The local stand-in for ``python:3.11-slim-bookworm``: made once (one to three minutes), then reused;
    named after what makes it, so a change to the packages or options makes a new one."""
    key = hashlib.sha256("\n".join(base_argv(Path("base.tar"))).encode()).hexdigest()[:12]
    tag = f"localhost/agentic-airflow-base:{BASE_SUITE}-{key}"
    if podman("image", "exists", tag, check=False).returncode == 0:
        return tag
    with locked("base"):
        if podman("image", "exists", tag, check=False).returncode == 0:
            return tag
        tarball = cache_dir() / f"base-{BASE_SUITE}-{key}.tar"
        if not tarball.exists():
            print(
                f"making the base image from Debian's packages: {tarball} (once per machine)", file=sys.stderr
            )
            partial = tarball.with_suffix(".partial.tar")
            partial.unlink(missing_ok=True)
            run(base_argv(partial), timeout=900)
            partial.rename(tarball)
        podman("import", str(tarball), tag, timeout=300)
    return tag


# -------------------------------------------------------------------------------------- wheelhouse


def extras() -> list[str]:
    """The extras the Dockerfile installs (``".[agent,sidecar,cli]"``): the wheelhouse serves them."""
    found = re.search(r'"\.\[([a-z,]+)\]"', DOCKERFILE.read_text())
    if found is None:
        raise ImageError('the Dockerfile installs no ".[extras]"')
    return found.group(1).split(",")


def wheel_requirements() -> list[str]:
    """What the build installs: the extras' dependencies, the build backend, and pip itself."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    optional = pyproject["project"]["optional-dependencies"]
    needed = {str(req) for extra in extras() for req in optional[extra]}
    needed |= {str(req) for req in pyproject["build-system"]["requires"]}
    return sorted(needed | {"pip", "setuptools", "wheel"})


def wheelhouse() -> Path:
    """The wheels the offline build installs, at the versions ``locks/dev.txt`` records; fetched once
    per lock (and per requirement list), ~20 s."""
    if not LOCK.exists():
        raise ImageError(f"{LOCK.relative_to(ROOT)} is missing: scripts/lock --dev makes it")
    requirements = wheel_requirements()
    key = hashlib.sha256(
        LOCK.read_bytes() + "\n".join([*requirements, platform.machine()]).encode()
    ).hexdigest()[:16]
    house = cache_dir() / f"wheels-{key}"
    if (house / ".complete").exists():
        return house
    with locked("wheels"):
        if (house / ".complete").exists():
            return house
        print(f"fetching the image's wheels into {house}", file=sys.stderr)
        shutil.rmtree(house, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix="wheels-", dir=cache_dir()))
        try:
            # Binary wheels only, as the build stage has no compiler either.
            run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "--quiet",
                    "--only-binary=:all:",
                    "-w",
                    str(partial),
                    "-c",
                    str(LOCK),
                    *requirements,
                ],
                timeout=600,
            )
            (partial / ".complete").write_text(key)
            partial.rename(house)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return house


# ------------------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class Built:
    tag: str
    image_id: str
    seconds: float  # the podman build
    size_bytes: int
    setup_seconds: float  # the base and the wheelhouse, ~0 once cached


def build(tag: str, *, log: Path | None = None, timeout: float = 900) -> Built:
    """Build the Dockerfile offline (local base, wheelhouse) as ``tag``. No intermediate images are
    kept (``--layers=false``): removing the tag leaves nothing behind. The previous image of ``tag``,
    untagged by this build, is removed."""
    require_tools()
    started = time.monotonic()
    base, house = base_image(), wheelhouse()
    setup_seconds = time.monotonic() - started
    previous = image_id(tag)
    started = time.monotonic()
    run(
        [
            *PODMAN,
            "build",
            "--format",
            "docker",
            "--layers=false",
            "--network",
            "host",
            *ULIMITS,
            "--build-arg",
            f"PYTHON_IMAGE={base}",
            "--build-arg",
            "PIP_SOURCE=wheels",
            "--build-context",
            f"wheels={house}",
            "--tag",
            tag,
            "--file",
            str(DOCKERFILE),
            str(ROOT),
        ],
        timeout=timeout,
        log=log,
    )
    seconds = time.monotonic() - started
    built = image_id(tag)
    if built is None:
        raise ImageError(f"the build reported success but {tag} is not there")
    if previous is not None and previous != built:
        podman("rmi", previous, check=False)  # fails harmlessly while another tag or a container holds it
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
    return Built(tag, built, seconds, size, setup_seconds)


def image_id(tag: str) -> str | None:
    found = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    return found.stdout.strip() if found.returncode == 0 else None


def remove_image(tag: str) -> None:
    """Remove ``tag`` (the image with it, unless another tag holds it); absent is fine. ``--force``
    removes the containers still running it too (one left by a command that timed out)."""
    if image_id(tag) is not None:
        podman("rmi", "--force", tag, timeout=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default=default_tag(), help="the image's name (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        log = cache_dir() / "build.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        built = build(args.tag, log=log)
    except ImageError as exc:
        print(f"scripts/image: {exc}", file=sys.stderr)
        return 1
    size = f"{built.size_bytes / 1e6:.0f} MB"
    times = f"base and wheels ready in {built.setup_seconds:.0f} s, built in {built.seconds:.0f} s"
    print(f"{built.tag} ({built.image_id[:12]}): {size}; {times}")
    print(f"  run it: {' '.join(PODMAN)} run {' '.join(ULIMITS)} --network host ... {built.tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
