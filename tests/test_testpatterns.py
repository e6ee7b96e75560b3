"""`harvester test-patterns`: the report an operator reads after changing login_log_format."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from harvester import cli, native, patterns

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name", sorted(p.stem for p in GOLDEN.glob("*.log")))
def test_the_report_counts_the_rows_the_backfill_engine_stores_for_each_golden_log(name, capsys):
    rows = [json.loads(line) for line in (GOLDEN / f"{name}.rows.jsonl").read_text().splitlines() if line]
    status = cli.main(["test-patterns", "--timezone", "UTC", "--year", "2026", str(GOLDEN / f"{name}.log")])
    out = capsys.readouterr().out
    assert f"rows:    {len(rows)} last-login rows" in out
    assert ("engine:  native" if native.enabled() else "engine:  Python") in out
    assert "disagree" not in out
    assert status in (0, 1)  # 1: the log holds lines the pack watches for and does not understand


def test_a_posix_class_that_python_reads_as_a_plain_set_is_refused_when_the_pack_loads(tmp_path):
    pack = tmp_path / "mine.toml"
    pack.write_text('name = "mine"\nextends = "dovecot"\n[events.pop3_delete]\nkind = "pop3_delete"\n'
                    "service = \"pop3\"\nregex = 'pop3\\((?P<user>[[:alnum:]]+)\\)<(?P<pid>\\d+)>: del=1'\n")
    with pytest.raises(patterns.PackError, match=r"POSIX class .*reads differently under PCRE2.*\[A-Za-z\]"):
        patterns.load(str(pack))


def test_an_engine_disagreement_is_reported_and_fails(tmp_path, capsys, monkeypatch):
    """The native engine's rows against a traced Python run; when they differ, say so and exit 1."""
    from harvester import coalesce

    log = GOLDEN / "dovecot-2-4.log"
    taken = coalesce.Coalescer.take

    def lose_one_when_traced(self, *a, **k):
        rows = taken(self, *a, **k)
        return rows[1:] if self.trace is not None else rows

    monkeypatch.setattr(coalesce.Coalescer, "take", lose_one_when_traced)
    assert cli.main(["test-patterns", "--timezone", "UTC", "--year", "2026", str(log)]) == 1
    assert "disagree on 1 row(s)" in capsys.readouterr().out


def test_a_class_python_only_warns_about_still_loads(tmp_path):
    """[a-z0-9._%+--] makes Python's re warn (a possible set difference) but means the same to both engines:
    a pack that loaded before must still load."""
    pack = tmp_path / "mine.toml"
    pack.write_text('name = "mine"\nextends = "dovecot"\n[events.pop3_delete]\nkind = "pop3_delete"\n'
                    "service = \"pop3\"\nregex = 'pop3\\((?P<user>[a-z0-9._%+--]+)\\)<(?P<pid>\\d+)>: del=1'\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Python's own note on such a class, expected here
        assert "pop3_delete" in patterns.load(str(pack)).events
