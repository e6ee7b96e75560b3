"""One TOML file, every key also a flag; unknown keys and bad values name key and file."""

from __future__ import annotations

import pytest

from harvester import cli, config
from harvester.config import ConfigError


def settings_from(tmp_path, text: str, *flags: str) -> config.Settings:
    f = tmp_path / "h.toml"
    f.write_text(text)
    args = cli.build_parser().parse_args(["backfill", "--config", str(f), *flags, "x.log"])
    return config.resolve(args)


def test_file_values_and_flags_merge_flags_winning(tmp_path):
    s = settings_from(tmp_path, 'timezone = "Europe/Berlin"\nwebmail_networks = ["10.0.5.0/24"]\nyear = 2025\n',
                      "--year", "2024", "--webmail-networks", "10.0.0.0/8,2001:db8::/32")
    assert s.timezone == "Europe/Berlin"
    assert s.year == 2024 and s.source["year"] == "--year"
    assert s.webmail_networks == ["10.0.0.0/8", "2001:db8::/32"]


@pytest.mark.parametrize(("text", "message"), [
    ("colour = 1", "unknown setting 'colour'"),
    ('webmail_networks = ["10.0.0.300/8"]', "bad value for 'webmail_networks'"),
    ('timezone = "Mars/Olympus"', "bad value for 'timezone'"),
    ("year = 12", "bad value for 'year'"),
    ('store = "oracle://x"', "bad value for 'store'"),
    ("[cassandra]\nhosts = 1", "unknown section [cassandra]"),
    ("year = ", "not valid TOML"),
])
def test_bad_config_names_the_key_and_the_file(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        settings_from(tmp_path, text)
    assert message in str(e.value) and str(tmp_path / "h.toml") in str(e.value)


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    f = tmp_path / "h.toml"
    f.write_text("colour = 1\n")
    assert cli.main(["backfill", "--config", str(f), "x.log"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"harvester: {f}: unknown setting 'colour'") and "Traceback" not in err


def test_every_setting_is_documented_in_the_readme():
    readme = (config.Path(__file__).parent.parent / "README.md").read_text()
    for opt in config.OPTIONS:
        assert f"`{opt.key}`" in readme, opt.key


def test_shipped_example_config_is_valid(tmp_path):
    example = config.Path(__file__).parent.parent / "deploy" / "harvester.toml.example"
    s = config.Settings()
    config.load_file(s, example)
    assert s.webmail_networks and s.store.startswith("sqlite:////")
