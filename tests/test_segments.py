"""Cutting files into segments: every line belongs to exactly one segment, whatever the cut."""

from __future__ import annotations

import gzip
import random

import pytest

from harvester import segments
from harvester.segments import Segment


@pytest.mark.parametrize("compressed", [False, True])
def test_segments_reassemble_the_file_exactly(tmp_path, monkeypatch, compressed):
    rng = random.Random(5)
    for trial in range(25):
        lines = [b"x" * rng.randint(0, 300) + str(i).encode() for i in range(rng.randint(1, 2000))]
        data = b"\n".join(lines) + (b"\n" if trial % 3 else b"")
        path = tmp_path / ("f.gz" if compressed else "f")
        path.write_bytes(gzip.compress(data, 1) if compressed else data)
        monkeypatch.setattr(segments, "CHUNK", rng.choice([7, 100, 4096]))
        for count in (1,) if compressed else (1, 2, 3, 5):
            parts = [b"".join(p for _, p in segments._bounded_pieces(Segment(str(path), k, count, "syslog", "bsd", 0)))
                     for k in range(count)]
            assert b"".join(parts) == data, (trial, count)


def test_a_compressed_file_is_one_segment_whatever_its_size(tmp_path, monkeypatch):
    monkeypatch.setattr(segments, "MIN_SEGMENT", 1)
    path = tmp_path / "maillog.1.gz"
    path.write_bytes(gzip.compress(b"line\n" * 1000))
    plain = tmp_path / "maillog"
    plain.write_bytes(b"line\n" * 1000)
    assert len(segments.plan(path, "syslog", "bsd", 0, workers=4)) == 1
    assert len(segments.plan(plain, "syslog", "bsd", 0, workers=4)) == 4
