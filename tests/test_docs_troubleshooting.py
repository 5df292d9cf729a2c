"""docs/troubleshooting.md quotes the real messages: every quoted log line and answer is one the code makes.

Each line of a ```log block is a sidecar JSON log line, an agent log line (``time LEVEL logger:
message``), an exception line from Airflow's task log (``Class: message``), or a line a service prints
on stderr; each ```json block is an HTTP answer. Its message must match a string literal of the
project (``%s`` and f-string fields match anything), so a reworded message fails this test until the
guide follows.
"""

from __future__ import annotations

import ast
import json
import re
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "troubleshooting.md"
PACKAGES = ("servicekit", "agent_api", "sidecar_api", "agent", "reconciler", "router_db", "agentic_airflow")
AGENT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) ([\w.]+): (.*)$")
EXCEPTION_LINE = re.compile(r"^([A-Z]\w+(?:Error|Exception)): (.*)$")


def _pattern(node: ast.AST) -> str | None:
    """A regular expression for a string literal, its first line only (messages are shown by line)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = re.escape(node.value.split("\n")[0])
        return re.sub(r"%[sdr]|%\\\.\d+f", ".*", text)
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(re.escape(str(value.value)))
            else:
                parts.append(".*")
        return "".join(parts).split("\\\n")[0]
    return None


@cache
def messages() -> tuple[re.Pattern[str], ...]:
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                pattern = _pattern(node)
                # Enough literal text to identify a message: ".*: .*" would match anything.
                if pattern and len(pattern.replace(".*", "").replace("\\", "")) >= 10:
                    found.add(pattern)
    return tuple(re.compile(p, re.DOTALL) for p in found)


@cache
def source_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def made_by_the_code(message: str) -> bool:
    return any(p.fullmatch(message) for p in messages())


def blocks(language: str) -> list[str]:
    text = GUIDE.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_the_matcher_tells_real_messages_from_invented_ones() -> None:
    assert made_by_the_code("agent unreachable; stop resumes next cycle")
    assert made_by_the_code("job stopped (rc=-15, terminated)")
    assert made_by_the_code("agent vm-2 communication failed: GET http://x/log: ClientConnectorError")
    assert not made_by_the_code("agent unreachable; stop abandoned")


def test_every_quoted_log_line_is_one_the_code_writes() -> None:
    lines = [line for block in blocks("log") for line in block.splitlines() if line.strip()]
    assert len(lines) >= 10
    for line in lines:
        if line.startswith("{"):
            entry = json.loads(line)
            assert {"ts", "level", "logger", "msg"} <= set(entry), line
            assert entry["level"] in ("info", "warning", "error"), line
            module = ROOT / (entry["logger"].replace(".", "/") + ".py")
            assert module.exists() or (ROOT / entry["logger"]).is_dir(), f"no logger {entry['logger']}"
            message = entry["msg"]
        elif agent := AGENT_LINE.match(line):
            assert (ROOT / (agent.group(2).replace(".", "/") + ".py")).exists(), line
            message = agent.group(3)
        elif exception := EXCEPTION_LINE.match(line):
            assert exception.group(1) in source_text(), f"{exception.group(1)} is not raised here"
            message = exception.group(2)
        else:
            message = line
        assert made_by_the_code(message), f"no message of the code reads: {message}"


def test_every_quoted_answer_is_one_the_services_give() -> None:
    answers = [json.loads(block) for block in blocks("json")]
    assert len(answers) >= 4
    for answer in answers:
        quoted = [answer[k] for k in ("error", "message", "reason") if isinstance(answer.get(k), str)]
        assert quoted, answer
        for message in quoted:
            assert made_by_the_code(message), f"no message of the code reads: {message}"


def test_the_guide_covers_the_failures_people_ask_about() -> None:
    text = GUIDE.read_text(encoding="utf-8")
    for topic in (
        "Job not found with provided identifiers",
        "Agent communication failed",
        "communication failed",
        "401 from the router",
        "401 from an agent",
        "KillMode=process",
    ):
        assert topic in text, topic
