"""The files in deploy/: the systemd unit, the Prometheus scrape config and alerts, the Grafana dashboard.

- The unit passes `systemd-analyze verify` and keeps its `systemd-analyze security` exposure score at or
  below MAX_EXPOSURE. ExecStart's binary (/opt/harvester/venv/bin/harvester) does not exist on a
  development machine and verify rejects a unit whose binary is missing, so the unit is verified as a
  copy whose ExecStart path alone points at /bin/true; the untouched unit is verified too, and its only
  complaint may be that missing binary.
- Every PromQL expression in the dashboard and the alerts uses only metrics harvester exports (the list
  below, which must match what harvester.metrics registers) or prometheus-client's process_/python_ ones.
- With promtool (Debian package `prometheus`): the scrape config and the rules pass `promtool check`,
  the rules' unit tests (deploy/alerts.test.yml) pass, and the dashboard's expressions parse. With the
  prometheus server binary from the same package, the relabeling is checked on a real Prometheus.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "harvester.service"
DROPINS = DEPLOY / "harvester.service.d"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
PROMETHEUS_YML = DEPLOY / "prometheus.yml"
ALERTS = DEPLOY / "alerts.yml"
ALERTS_TEST = DEPLOY / "alerts.test.yml"
FILE_SD = DEPLOY / "file_sd"

ENTRY_POINT = "/opt/harvester/venv/bin/harvester"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
NO_PROMTOOL = "promtool not installed (Debian: apt-get install prometheus)"
# Measured: 1.3 with systemd 252 (Debian 12). A little slack for other systemd versions' weights.
MAX_EXPOSURE = 1.5

# The daemon's metrics (the contract); histograms also have _bucket, _sum and _count series.
COUNTERS_AND_GAUGES = {
    "harvester_build_info", "harvester_lines_read_total", "harvester_bytes_read_total", "harvester_events_total",
    "harvester_lines_not_understood_total", "harvester_bad_input_total", "harvester_store_rows_written_total",
    "harvester_store_write_errors_total", "harvester_store_retries_total", "harvester_store_up",
    "harvester_events_waiting", "harvester_checkpoint_lag_bytes", "harvester_newest_stored_event_timestamp_seconds",
    "harvester_rotations_total",
}
HISTOGRAMS = {"harvester_store_write_duration_seconds", "harvester_line_to_store_delay_seconds"}
METRICS = COUNTERS_AND_GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

_FUNCTIONS = {
    # aggregations
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor", "histogram_quantile",
    "histogram_count", "histogram_sum", "histogram_fraction", "holt_winters", "hour", "idelta", "increase", "irate",
    "label_join", "label_replace", "ln", "log2", "log10", "minute", "month", "predict_linear", "rate", "resets",
    "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "time", "timestamp", "vector", "year",
    "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time",
    "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time",
}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, strings and keywords left out).

    Raises ValueError on a call of something that is not a PromQL function (a typo, or a metric name
    followed by a parenthesis)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries ([5m], [$__rate_interval])
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call:
            if word not in _FUNCTIONS:
                raise ValueError(f"{word}( is not a PromQL function, in {expr!r}")
        elif word.lower() not in _KEYWORDS:
            names.add(word)
    return names


def unknown_metrics(expr: str, also: frozenset[str] = frozenset()) -> set[str]:
    return {n for n in metric_names(expr)
            if n not in METRICS and n not in also and not n.startswith(("process_", "python_"))}


def test_metric_names_finds_metrics_and_only_metrics():
    expr = ('histogram_quantile(0.99, sum by (instance, le) (rate(harvester_line_to_store_delay_seconds_bucket'
            '{job=~"$job", instance=~"$instance"}[$__rate_interval]))) > 2 and on (instance) '
            'time() - max by (instance) (harvester_newest_stored_event_timestamp_seconds offset 5m) > 1e3 * 64')
    assert metric_names(expr) == {"harvester_line_to_store_delay_seconds_bucket",
                                  "harvester_newest_stored_event_timestamp_seconds"}
    assert unknown_metrics('rate(harvester_lines_read{file="x"}[5m]) + process_cpu_seconds_total') == {
        "harvester_lines_read"}
    assert unknown_metrics('up{job="harvester"} == 0') == {"up"}
    with pytest.raises(ValueError, match="harvester_store_up"):
        metric_names("harvester_store_up(5)")


def test_the_metric_list_is_what_harvester_registers():
    from prometheus_client import REGISTRY

    import harvester.metrics  # noqa: F401  (registers its metrics in the default registry)

    exported = set()
    for family in REGISTRY.collect():
        if family.type == "counter":
            exported.add(family.name + "_total")
        elif family.type == "histogram":
            exported |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            exported.add(family.name)
    missing = METRICS - exported
    assert not missing, f"deploy/ uses metrics harvester.metrics does not register: {sorted(missing)}"
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= exported


# --- systemd ------------------------------------------------------------------------------------------

def unit_settings(text: str) -> dict[str, list[str]]:
    """'Section.Key' -> values in order (systemd allows a key several times; an empty value resets)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def test_the_unit_runs_the_daemon_the_way_it_expects():
    s = unit_settings(UNIT.read_text())

    def one(key: str) -> str:
        values = s.get("Service." + key)
        assert values and len(values) == 1, f"{key}= should be set once, is {values}"
        return values[0]

    assert one("ExecStart").split()[:2] == [ENTRY_POINT, "run"]
    # The shell's builtin kill: /bin/kill (procps) may be missing.
    assert one("ExecReload") == """/bin/sh -c 'kill -HUP "$MAINPID"'"""
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30", "Restart": "on-failure",
        "TimeoutStopSec": "30", "StateDirectory": "harvester", "DynamicUser": "yes", "SupplementaryGroups": "adm",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
        "NoNewPrivileges": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "ProtectClock": "yes", "ProtectHostname": "yes",
        "RestrictNamespaces": "yes", "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "SystemCallArchitectures": "native", "CapabilityBoundingSet": "", "UMask": "0077",
        "ReadOnlyPaths": "/var/log",
        # PCRE2's JIT (in the Rust extension) needs writable+executable memory
        "MemoryDenyWriteExecute": "no",
    }
    assert {k: one(k) for k in expected} == expected
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert s["Service.SystemCallFilter"][0] == "@system-service"
    # StateDirectory= is the one writable place; nothing else is opened up.
    assert "Service.ReadWritePaths" not in s
    assert s["Install.WantedBy"] == ["multi-user.target"]
    # The Cassandra password comes in as a credential, from a drop-in (it would stop SQLite installs).
    dropin_text = (DROPINS / "cassandra-credential.conf").read_text()
    assert unit_settings(dropin_text)["Service.LoadCredential"] == [
        "cassandra.password:/etc/harvester/cassandra.password"]
    assert 'cassandra_password_file = "/run/credentials/harvester.service/cassandra.password"' in dropin_text


@pytest.fixture
def unit_copy(tmp_path) -> Path:
    """The unit and its drop-ins in a temporary directory, ExecStart's binary replaced by /bin/true."""
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze not installed")
    text = UNIT.read_text()
    assert f"ExecStart={ENTRY_POINT} " in text
    (tmp_path / UNIT.name).write_text(text.replace(f"ExecStart={ENTRY_POINT} ", "ExecStart=/bin/true "))
    shutil.copytree(DROPINS, tmp_path / DROPINS.name)
    return tmp_path / UNIT.name


def _analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd)


def test_systemd_analyze_verify_accepts_the_unit_and_its_drop_in(unit_copy):
    # Unknown keys and bad values are warnings with exit code 0: so any output at all is a failure.
    r = _analyze("verify", str(unit_copy))
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def test_the_untouched_unit_only_lacks_its_binary(tmp_path):
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze not installed")
    shutil.copy(UNIT, tmp_path / UNIT.name)
    r = _analyze("verify", str(tmp_path / UNIT.name))
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    if Path(ENTRY_POINT).exists():
        assert (r.returncode, complaints) == (0, [])
    else:
        assert complaints == [f"harvester.service: Command {ENTRY_POINT} is not executable: No such file or directory"]


def test_systemd_analyze_security_exposure_stays_low(unit_copy):
    r = _analyze("security", "--offline=true", "--no-pager", str(unit_copy))
    if "offline" in r.stderr and ("unrecognized" in r.stderr or "Unknown" in r.stderr):
        pytest.skip(f"this systemd-analyze has no --offline (systemd >= 250): {r.stderr.strip()}")
    m = re.search(r"Overall exposure level for harvester\.service: (\d+\.\d+) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout
    # MemoryDenyWriteExecute= is deliberately off (PCRE2's JIT); everything else of weight is covered.
    flagged = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("✗")}
    assert "MemoryDenyWriteExecute=" in flagged
    assert not flagged & {"User=/DynamicUser=", "NoNewPrivileges=", "ProtectSystem=", "ProtectHome=",
                          "PrivateTmp=", "PrivateDevices=", "SystemCallFilter=~@privileged", "UMask="}


# --- Grafana --------------------------------------------------------------------------------------

def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _exprs(dash: dict) -> list[tuple[str, str]]:
    out = []
    for p in dash["panels"]:
        for sub in [p, *p.get("panels", [])]:
            out += [(sub["title"], t["expr"]) for t in sub.get("targets", [])]
    return out


def test_the_dashboard_has_its_variables_and_panels():
    dash = _dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] == "harvester" and dash["id"] is None
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query" and variables["instance"]["multi"]
    assert "harvester_build_info" in variables["instance"]["query"]["query"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])
    # Panels do not overlap on the 24-column grid.
    taken: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"panel {p['title']!r} overlaps another"
        taken |= cells
    text = "\n".join(e for _, e in _exprs(dash))
    for needle in [
        "sum by (instance, file) (rate(harvester_lines_read_total",
        "sum by (kind, service) (rate(harvester_events_total",
        "rate(harvester_lines_not_understood_total",
        "rate(harvester_store_rows_written_total",
        "histogram_quantile(0.5, sum by (instance, le) (rate(harvester_store_write_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (instance, le) (rate(harvester_store_write_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (instance, le) (rate(harvester_line_to_store_delay_seconds_bucket",
        "harvester_store_up{",
        "harvester_events_waiting{",
        "harvester_checkpoint_lag_bytes{",
        "time() - max by (instance) (harvester_newest_stored_event_timestamp_seconds",
        "harvester_rotations_total{",
        "sum by (reason) (rate(harvester_bad_input_total",
        "rate(process_cpu_seconds_total",
        "process_resident_memory_bytes{",
    ]:
        assert needle in text, needle


def test_the_dashboard_only_queries_harvester_metrics():
    for title, expr in _exprs(_dashboard()):
        assert not unknown_metrics(expr), f"panel {title!r}: {expr}"


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_the_dashboard_expressions_parse(tmp_path):
    # promtool has no "check expression": each becomes a recording rule, with Grafana's range variables
    # replaced by durations (label values like "$instance" are plain strings to PromQL).
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(_exprs(_dashboard())):
        promql = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$__range", "1h")
        lines += [f"      - record: dashboard:expr{i}", f"        expr: {json.dumps(promql)}"]
    (tmp_path / "rules.yml").write_text("\n".join(lines) + "\n")
    r = subprocess.run([PROMTOOL, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --- Prometheus -----------------------------------------------------------------------------------

def rule_exprs(text: str) -> dict[str, str]:
    """alert name -> expr, from a rules file (one-line or block-scalar exprs; enough for alerts.yml)."""
    out: dict[str, str] = {}
    lines = text.splitlines()
    name = ""
    for i, line in enumerate(lines):
        m = re.match(r"\s*- (?:alert|record): (\S+)", line)
        if m:
            name = m.group(1)
        m = re.match(r"(\s*)expr: (.*)", line)
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        if value in ("|", ">", "|-", ">-"):
            block = []
            for more in lines[i + 1:]:
                if more.strip() and len(more) - len(more.lstrip()) <= indent:
                    break
                block.append(more.strip())
            value = " ".join(block)
        out[name] = value.strip("'\"") if value[:1] in "'\"" else value
    return out


def test_the_alerts_cover_what_an_sre_needs_and_only_query_harvester_metrics():
    exprs = rule_exprs(ALERTS.read_text())
    assert {"HarvesterDown", "HarvesterStoreDown", "HarvesterNothingStored", "HarvesterStoreWriteErrors",
            "HarvesterCheckpointLagGrowing", "HarvesterLineToStoreDelayHigh"} <= set(exprs)
    for name, expr in exprs.items():
        assert not unknown_metrics(expr, also=frozenset({"up"})), f"{name}: {expr}"
    assert "harvester_store_up == 0" in exprs["HarvesterStoreDown"]
    assert "histogram_quantile(0.99" in exprs["HarvesterLineToStoreDelayHigh"]
    assert exprs["HarvesterLineToStoreDelayHigh"].endswith("> 2")
    assert "[15m]" in exprs["HarvesterNothingStored"]


def test_the_scrape_config_says_what_it_should():
    # No YAML parser in the venv: promtool below does the real parsing; these are the promises.
    text = PROMETHEUS_YML.read_text()
    assert "\t" not in text
    for needle in ["scrape_interval: 15s", "job_name: harvester", "static_configs:", "file_sd_configs:",
                   "- file_sd/harvester-*.yml", "relabel_configs:", "target_label: instance",
                   "- harvester-alerts.yml", ":9854"]:
        assert needle in text, needle
    assert list(FILE_SD.glob("harvester-*.yml"))


def _etc_prometheus(tmp_path: Path) -> Path:
    """deploy/'s files laid out the way deploy/README.md installs them in /etc/prometheus."""
    etc = tmp_path / "etc-prometheus"
    etc.mkdir()
    shutil.copy(PROMETHEUS_YML, etc / "prometheus.yml")
    shutil.copy(ALERTS, etc / "harvester-alerts.yml")
    shutil.copytree(FILE_SD, etc / "file_sd")
    return etc


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_accepts_the_scrape_config_and_the_rules(tmp_path):
    etc = _etc_prometheus(tmp_path)
    for args in (["check", "config", str(etc / "prometheus.yml")], ["check", "rules", str(ALERTS)],
                 ["test", "rules", str(ALERTS_TEST)]):
        r = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}"
        assert "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian: apt-get install prometheus)")
def test_relabeling_names_instances_after_backends(tmp_path):
    etc = _etc_prometheus(tmp_path)
    (etc / "file_sd" / "harvester-more.yml").write_text(
        '- targets: ["[2001:db8::11]:9854", "10.0.7.30:9854", "localhost:9854"]\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={etc / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        targets: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(targets) < 9:
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5) as resp:
                    data = json.load(resp)["data"]
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                continue
            targets = {t["discoveredLabels"]["__address__"]: t["labels"]["instance"] for t in data["activeTargets"]}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert targets == {
        "mx1.example.net:9854": "mx1", "mx2.example.net:9854": "mx2", "mx3.example.net:9854": "mx3",
        "mx4.example.net:9854": "mx4", "mx5.example.net:9854": "mx5", "10.0.7.21:9854": "mx6",
        "[2001:db8::11]:9854": "2001:db8::11", "10.0.7.30:9854": "10.0.7.30", "localhost:9854": "localhost",
    }


def test_a_dynamic_user_without_a_home_gets_the_default_store_in_its_state_directory(monkeypatch, tmp_path):
    # DynamicUser=yes: no home directory (Path.home() raises), $STATE_DIRECTORY set; the unit passes no --config.
    from harvester.sinks import default_url

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    assert default_url() == "sqlite:///" + str(tmp_path / "harvester.db")
