"""Items 1-3 of issue 13 together: kill -9 at random moments and rotations of every kind, some while the
daemon is down, must end with the store a backfill of every line gives (tests/trial.py has the long run)."""

from __future__ import annotations

from tests.trial import run_trial


def test_kill_9_and_rotations_of_every_kind_while_running_and_stopped_lose_pin_and_null_nothing(tmp_path):
    out = run_trial(tmp_path, kills=6, rotations=8, rate=3000, seed=7, lines=24_000)
    assert out.kills == 6 and out.rotations >= 8
    assert (out.missing, out.stale, out.wrong_ip) == (0, 0, 0), str(out)
