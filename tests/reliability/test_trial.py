"""Items 1-3 of issue 13 together: kill -9 at random moments and rotations of every kind, some while the
daemon is down, must end with the store a backfill of every line gives, but for lines written to a file
logrotate had deleted while the daemon was down (tests/trial.py has the long run)."""

from __future__ import annotations

import pytest

from tests.trial import FAMILIES, run_trial


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kill_9_and_rotations_while_running_and_stopped_lose_pin_and_null_nothing(tmp_path, family):
    out = run_trial(tmp_path, kills=4, rotations=6, rate=3000, seed=7, lines=16_000, family=family)
    print(out)
    assert out.kills == 4 and out.rotations >= 6
    assert (out.missing, out.stale, out.wrong_ip) == (0, 0, 0), str(out)
