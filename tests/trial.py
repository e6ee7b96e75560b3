"""A hostile operator's week, compressed: `harvester run` follows a maillog written at a steady rate while
real logrotate rotates it every way it can (create, copytruncate, compress, delaycompress) and the daemon
is killed with -9 at random moments, sometimes with rotations while it is down. At the end its store is
compared with a one-shot backfill of every line written: keys missing, keys with a stale time, keys with
the right time but a wrong IP (an LMTP session whose address was lost).

One kind of line is left out of that backfill, and counted apart: lines the writer appended to its old
descriptor after a create+compress rotation while the daemon was down. logrotate had renamed, compressed and
deleted that file already, so they are in no file anyone can open (with the daemon running, its open
descriptor still reads them, and they stay in).

    python -m tests.trial [--kills 22] [--rotations 25] [--rate 3000] [--seed 1] [--keep DIR]

tests/reliability/test_trial.py runs a small fixed-seed trial; the closing figures come from this command.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import astuple, dataclass
from pathlib import Path

from tests import corpus
from tests.daemon_kit import Writer, logrotate, reference, rows, start

# Rotation kinds by the names they leave: logrotate only shifts names of its configured form, so a site's
# config picks one family (switching from plain to compressed names mid-way would make logrotate rename
# the live file over an older maillog.1, a loss of its own). Within a family every kind mixes.
FAMILIES = {
    "plain": ("create", "copytruncate"),
    "compress": ("create\n    compress", "copytruncate\n    compress"),
    "delaycompress": ("create\n    compress\n    delaycompress", "copytruncate\n    compress\n    delaycompress"),
}


@dataclass
class Outcome:
    keys: int
    missing: int
    stale: int
    wrong_ip: int
    kills: int
    rotations: int
    while_stopped: int
    lines: int
    unreachable: int = 0  # lines written to a deleted file while the daemon was down (not in the reference)

    def __add__(self, other: Outcome) -> Outcome:
        return Outcome(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def __str__(self) -> str:
        return (f"{self.kills} kill -9, {self.rotations} rotations ({self.while_stopped} while stopped), "
                f"{self.lines:,} lines ({self.unreachable} written to a deleted file while stopped): "
                f"{self.missing} keys missing, {self.stale} stale, {self.wrong_ip} wrong IP of {self.keys:,}")


def run_trial(tmp: Path, *, kills: int, rotations: int, rate: int, seed: int, lines: int,
              family: str = "plain") -> Outcome:
    rng = random.Random(seed)
    kinds = FAMILIES[family]
    src = tmp / "corpus"
    corpus.write_maillog(src, lines=lines, users=max(lines // 25, 200), tz="UTC", seed=seed)
    log_lines = src.read_bytes().splitlines(keepends=True)
    (tmp / "log").mkdir()
    w = Writer(tmp / "log" / "maillog", log_lines)
    db = tmp / "h.db"
    store = f"sqlite:///{db}"
    # Spread the kills and rotations over the lines: each step writes a slice at `rate`, then acts.
    steps = ["kill"] * kills + ["rotate"] * rotations
    rng.shuffle(steps)
    per_step = max(len(log_lines) // (len(steps) + 1), 1)
    events = (tmp / "events.txt").open("w")  # what happened after which line, for a failure's post-mortem
    proc = start(tmp, store)
    done_kills = done_rot = stopped_rot = 0
    unreachable: set[int] = set()  # indexes of lines no file holds
    try:
        w.write(per_step)
        while not (tmp / "state" / "checkpoints.json").exists():  # a daemon that has run a while
            time.sleep(0.05)
        for step in steps:
            _write_at(w, per_step, rate, rng)
            if step == "rotate":
                _rotate(tmp, w, rng.choice(kinds), rng, events, None)
                done_rot += 1
                continue
            time.sleep(rng.uniform(0, 0.6))  # mid-flush or between flushes
            proc.kill()
            _keep_log(tmp, proc, done_kills)
            done_kills += 1
            print(f"line {w.next}: kill -9 (daemon-{done_kills - 1})", file=events, flush=True)
            for _ in range(rng.choice((0, 0, 1, 2))):  # rotated while the daemon is down
                w.write(rng.randrange(1, per_step // 4 + 2))
                _rotate(tmp, w, rng.choice(kinds), rng, events, unreachable)
                done_rot += 1
                stopped_rot += 1
            _keep_checkpoint(tmp, done_kills)
            print(f"line {w.next}: start (daemon-{done_kills}, checkpoint-{done_kills})", file=events, flush=True)
            proc = start(tmp, store)
        w.write(len(log_lines))
        want = reference(tmp, [x for i, x in enumerate(log_lines[:w.next]) if i not in unreachable])
        deadline = time.monotonic() + 60
        got = rows(db)
        while got != want and time.monotonic() < deadline:
            time.sleep(0.5)
            got = rows(db)
    finally:
        w.close()
        proc.kill()
        _keep_log(tmp, proc, done_kills)
        events.close()
    stored = {(u, s): (t, ip) for u, s, t, ip, _ in got}
    missing = stale = wrong_ip = 0
    for u, s, t, ip, _ in want:
        have = stored.get((u, s))
        if have is None:
            missing += 1
        elif have[0] < t:
            stale += 1
        elif have[0] == t and have[1] != ip:
            wrong_ip += 1
    return Outcome(len(want), missing, stale, wrong_ip, done_kills, done_rot, stopped_rot, w.next, len(unreachable))


def _rotate(tmp: Path, w: Writer, kind: str, rng: random.Random, events, stopped: set[int] | None) -> None:
    """One logrotate run, then a few lines the writer appends to its old descriptor before it reopens. With
    the daemon stopped (`stopped` given), those lines are added to it if that file is deleted already."""
    before = w.next
    logrotate(tmp, kind)
    w.write(rng.randrange(0, 40))  # the writer has not reopened yet
    w.reopen()
    gone = "create" in kind and "compress" in kind and "delaycompress" not in kind
    if stopped is not None and gone:
        stopped.update(range(before, w.next))
    print(f"line {before}: logrotate {kind.replace(chr(10), ' ').replace('    ', '')} "
          f"(daemon {'stopped' if stopped is not None else 'running'}); lines {before}-{w.next - 1} to the old "
          f"descriptor{', deleted: in no file' if stopped is not None and gone else ''}", file=events, flush=True)


def _share(n: int, i: int) -> int:
    """Family i's part of n."""
    return n // len(FAMILIES) + (1 if i < n % len(FAMILIES) else 0)


def _keep_checkpoint(tmp: Path, n: int) -> None:
    """The checkpoint restart n begins from, and the files it will look at (for a failure's post-mortem)."""
    state = tmp / "state" / "checkpoints.json"
    if state.exists():
        (tmp / f"checkpoint-{n}.json").write_bytes(state.read_bytes())
    listing = [f"{p.name} {p.stat().st_ino} {p.stat().st_size}" for p in sorted((tmp / "log").iterdir())]
    (tmp / f"files-{n}.txt").write_text("\n".join(listing) + "\n")


def _keep_log(tmp: Path, proc, n: int) -> None:
    """A killed daemon's log, kept beside the trial's files (daemon-N.log) for a failure's post-mortem."""
    _, err = proc.communicate()
    (tmp / f"daemon-{n}.log").write_text(err or "")


def _write_at(w: Writer, n: int, rate: int, rng: random.Random) -> None:
    """`n` lines at about `rate` lines/s, in bursts of a tenth of a second."""
    burst = max(rate // 10, 1)
    left = n
    while left > 0:
        k = min(burst, left)
        w.write(k, chunk=rng.randrange(20, 120))
        left -= k
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=22)
    ap.add_argument("--rotations", type=int, default=25)
    ap.add_argument("--rate", type=int, default=3000, help="lines per second written")
    ap.add_argument("--lines", type=int, default=240_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", metavar="DIR", help="run in DIR and keep its files (logs, store, daemon logs)")
    ap.add_argument("--family", choices=list(FAMILIES), action="append",
                    help="run only this family (its share of the kills, rotations and lines); repeatable")
    args = ap.parse_args()
    total = None
    for i, family in enumerate(FAMILIES):  # the kills and rotations shared out over the three families
        if args.family and family not in args.family:
            continue
        with tempfile.TemporaryDirectory(prefix="harvester-trial-") as d:
            where = Path(args.keep) / family if args.keep else Path(d)
            where.mkdir(parents=True, exist_ok=True)
            out = run_trial(where, kills=_share(args.kills, i), rotations=_share(args.rotations, i),
                            rate=args.rate, seed=args.seed + i, lines=_share(args.lines, i), family=family)
        print(f"{family:14s} {out}", flush=True)
        total = out if total is None else total + out
    out = total
    print(f"{'all':14s} {out}")
    return 0 if out.missing == out.stale == out.wrong_ip == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
