"""Cutting files into segments: every line belongs to exactly one segment, whatever the cut."""

from __future__ import annotations

import gzip
import random

import pytest

from harvester import segments
from harvester.sources import archive


@pytest.mark.parametrize("compressed", [False, True])
def test_segments_reassemble_the_file_exactly(tmp_path, monkeypatch, compressed):
    rng = random.Random(5)
    for trial in range(25):
        lines = [b"x" * rng.randint(0, 300) + str(i).encode() for i in range(rng.randint(1, 2000))]
        data = b"\n".join(lines) + (b"\n" if trial % 3 else b"")
        path = tmp_path / ("f.gz" if compressed else "f")
        path.write_bytes(gzip.compress(data, 1) if compressed else data)
        monkeypatch.setattr(archive, "BLOCK", rng.choice([7, 100, 4096]))
        size = path.stat().st_size
        for count in (1,) if compressed else (1, 2, 3, 5):
            cuts = [k * size // count for k in range(count)] + [None]
            parts = [b"".join(t.data[1:t.end] for t in archive.texts(path, lo, hi, max_line=1 << 20,
                                                                      on_long_line=print))
                     for lo, hi in zip(cuts, cuts[1:], strict=False)]
            assert b"".join(parts) == data, (trial, count)


def source(path, compressed=False):
    return segments.Source(str(path), path.stat().st_size, compressed, "syslog", "bsd", 0)


def test_a_compressed_file_is_never_cut_a_plain_one_is_cut_into_one_job_per_worker(tmp_path, monkeypatch):
    monkeypatch.setattr(segments, "MIN_SEGMENT", 1)
    path = tmp_path / "maillog.1.gz"
    path.write_bytes(gzip.compress(b"line\n" * 1000))
    plain = tmp_path / "maillog"
    plain.write_bytes(b"line\n" * 1000)
    assert [[(s.lo, s.hi) for s in job] for job in segments.plan([source(path, True)], workers=4)] == [[(0, None)]]
    jobs = segments.plan([source(plain)], workers=4)
    assert [[(s.lo, s.hi) for s in job] for job in jobs] == [[(0, 1250)], [(1250, 2500)], [(2500, 3750)],
                                                             [(3750, None)]]


def test_rotated_files_become_one_run_of_consecutive_lines_per_worker(tmp_path, monkeypatch):
    """Jobs are consecutive: every byte of every file in exactly one job, in backfill order, so each worker's
    parser reads its files one after the other as a sequential backfill would."""
    monkeypatch.setattr(segments, "MIN_SEGMENT", 1)
    rng = random.Random(3)
    files = []
    for k in range(6, 0, -1):
        compressed = k % 3 == 0
        path = tmp_path / (f"maillog.{k}.gz" if compressed else f"maillog.{k}")
        data = b"x" * rng.randint(100, 5000)
        path.write_bytes(gzip.compress(data) if compressed else data)
        files.append(source(path, compressed))
    for workers in (1, 2, 3, 7):
        jobs = segments.plan(files, workers)
        assert 1 <= len(jobs) <= workers
        flat = [s for job in jobs for s in job]
        for f in files:
            mine = [(s.lo, s.hi) for s in flat if s.path == f.path]
            bounds = [lo for lo, _ in mine] + [None]
            assert mine[0][0] == 0 and [hi for _, hi in mine] == bounds[1:], (workers, f.path, mine)
            if f.compressed:
                assert mine == [(0, None)]
        assert [s.path for s in flat] == sorted([s.path for s in flat], key=[f.path for f in files].index)
