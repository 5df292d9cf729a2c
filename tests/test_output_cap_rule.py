"""The rule of ``[agent] max_log_bytes`` and the supervisor's writer (agent/logcap.py), without
processes: the bound it promises, and a capped log written chunk by chunk staying under it, its head
whole, its middle a hole, its tail saying what was dropped. tests/test_output_cap.py runs the real
thing."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from agent.logcap import BLOCK, CappedLog, Dropped, chunk_bytes, dropped_range, read_output, trim_step

pytestmark = pytest.mark.fast

CAP = 2 * 1024 * 1024


def on_disk(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def hole(path: Path) -> Dropped | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return dropped_range(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("cap", [64 * 1024, 1024 * 1024, CAP, 100 * 1024 * 1024])
def test_the_cap_plus_a_step_and_a_chunk_stays_under_twice_the_cap(cap: int) -> None:
    assert cap + BLOCK + trim_step(cap) + chunk_bytes(cap) <= 2 * cap


def test_a_capped_log_never_holds_more_than_the_cap_a_step_and_a_chunk(tmp_path: Path) -> None:
    cap = 1024 * 1024
    log = CappedLog(str(tmp_path), cap)
    assert log.trimming  # the tests' file system punches holes
    path, line = tmp_path / "output.log", b"0123456789abcdef" * 4095 + b"line-end\n"
    peak, ends = 0, []
    for _ in range(300):  # ~19 MiB
        log.write(line)
        peak = max(peak, on_disk(path))
        dropped = hole(path)
        ends.append(dropped.end if dropped else 0)
    log.close()
    assert peak <= cap + BLOCK + trim_step(cap) + chunk_bytes(cap), peak
    assert on_disk(path) <= cap + 2 * BLOCK
    assert ends == sorted(ends) and ends[-1] > 0  # the dropped range only ever grows
    content = path.read_bytes()
    dropped = hole(path)
    assert dropped is not None and dropped.start == cap // 2
    assert content[: dropped.start] == (line * 20)[: dropped.start]  # the head, whole
    assert content[dropped.start : dropped.end].count(0) == dropped.end - dropped.start  # a hole
    assert b"\0" not in content[dropped.end :]
    assert content.endswith(
        b"line-end\n[agent] output past max_log_bytes=1048576 is dropped from its middle "
        b"(from byte 524288); the first and the latest output are kept\n"
    )


def test_reads_by_offset_stop_at_the_hole_and_answer_its_range_from_inside(tmp_path: Path) -> None:
    log = CappedLog(str(tmp_path), 64 * 1024)
    for number in range(40_000):
        log.write(b"line %d\n" % number)
    log.close()
    path = tmp_path / "output.log"
    dropped = hole(path)
    assert dropped is not None
    head, size, inside = read_output(path, 0, 10**6)
    assert inside is None and head == b"".join(b"line %d\n" % n for n in range(40_000))[: dropped.start]
    assert read_output(path, dropped.start + 5, 100) == (b"", size, dropped)
    tail, _, inside = read_output(path, dropped.end, 10**6)
    assert inside is None and b"\0" not in tail
    assert tail.endswith(b"the first and the latest output are kept\n")
    assert read_output(path, size + 10, 100) == (b"", size, None)
    assert read_output(tmp_path / "not-yet", 0, 100) == (b"", 0, None)


def test_a_reader_at_the_edge_of_the_hole_never_gets_the_zeros_of_a_punch(tmp_path: Path) -> None:
    """A writer punching as it goes (a small cap: a punch every 16 KiB) and a reader at the edge of
    the kept tail, where the punches land, in two threads: every byte read is output."""
    cap, path = 256 * 1024, tmp_path / "output.log"
    log = CappedLog(str(tmp_path), cap)
    done, reads, zeros = threading.Event(), [0], []

    def read_at_the_edge() -> None:
        while not done.is_set():
            size = os.stat(path).st_size
            offset = max(0, size - cap // 2 - 8192)
            data, _, dropped = read_output(path, offset, 64 * 1024)
            reads[0] += 1
            if dropped is None and b"\0" in data:
                zeros.append(offset)

    reader = threading.Thread(target=read_at_the_edge, daemon=True)
    reader.start()
    try:
        chunk = b"y\n" * (32 * 1024)
        for _ in range(100 * 1024 * 1024 // len(chunk)):  # 100 MiB
            log.write(chunk)
    finally:
        done.set()
        reader.join(timeout=10)
        log.close()
        path.unlink()
    assert reads[0] > 100 and zeros == [], (reads[0], zeros[:5])
