"""Prometheus metrics of the live daemon (names in base units, `_total` for counters).

Labels carry file paths, event kinds, services, pattern packs and reasons:
never a user name or an IP, so cardinality stays bounded.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from harvester import __version__

BUILD = Gauge("harvester_build_info", "Version and parsing engine of this harvester (always 1)",
              ["version", "engine"])
LINES = Counter("harvester_lines_read_total", "Log lines read", ["file"])
BYTES = Counter("harvester_bytes_read_total", "Log bytes read", ["file"])
EVENTS = Counter("harvester_events_total", "Events recognised", ["kind", "service"])
RAWLOG = Counter("harvester_rawlog_sessions_total", "Sessions read from rawlog directories", ["service"])
NOT_UNDERSTOOD = Counter("harvester_lines_not_understood_total",
                         "Lines that look like logins but no pattern of the pack matched", ["pack"])
BAD_INPUT = Counter("harvester_bad_input_total", "Bad input counted and skipped", ["reason"])
ROWS_WRITTEN = Counter("harvester_store_rows_written_total", "Rows the store acknowledged")
WRITE_ERRORS = Counter("harvester_store_write_errors_total", "Store writes that failed (rows kept for a retry)")
ROWS_REFUSED = Counter("harvester_store_rows_refused_total",
                       "Rows the store refused for what they are (never retried, named in the log)", ["reason"])
RETRIES = Counter("harvester_store_retries_total", "Flushes retried after a failed write")
WRITE_SECONDS = Histogram("harvester_store_write_duration_seconds", "Time of one flush to the store",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
STORE_UP = Gauge("harvester_store_up", "1 when the last write to the store succeeded")
WAITING = Gauge("harvester_events_waiting", "Rows read and coalesced, not yet acknowledged by the store")
LAG = Gauge("harvester_checkpoint_lag_bytes", "Bytes of a followed file after its checkpoint", ["file"])
NEWEST = Gauge("harvester_newest_stored_event_timestamp_seconds",
               "Unix time of the newest event the store acknowledged")
ROTATIONS = Counter("harvester_rotations_total", "Rotations of a followed file seen", ["file", "how"])
LINES_LOST = Counter("harvester_lines_lost_total",
                     "Log lines lost before harvester could read them (journald's rate limit dropped them; "
                     "a journal vacuumed past the checkpoint: see harvester_journal_lost_seconds_total)", ["reason"])
JOURNAL_LOST = Counter("harvester_journal_lost_seconds_total",
                       "Seconds of journal between the checkpointed entry and the oldest one left, when the "
                       "journal was vacuumed while harvester was down", ["source"])
SOURCES_READ = Gauge("harvester_sources_read",
                     "Sources being read (files followed, journals); 0: harvester reads nothing")
RELOADS = Counter("harvester_reloads_total", "Configuration reloads (SIGHUP), by result", ["result"])
SERVE_REQUESTS = Counter("harvester_serve_requests_total", "Requests to harvester serve, by route and status",
                         ["route", "status"])
SERVE_SECONDS = Histogram("harvester_serve_request_duration_seconds", "Time to answer a request, by route",
                          ["route"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
DELAY = Histogram("harvester_line_to_store_delay_seconds",
                  "From reading a block of lines to the store acknowledging its rows",
                  buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60))


def serve(listen: str, engine: str) -> None:
    """Start the /metrics endpoint on ADDR:PORT (an empty listen switches it off)."""
    BUILD.labels(__version__, engine).set(1)
    if not listen:
        return
    addr, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=addr.strip("[]") or "127.0.0.1")
