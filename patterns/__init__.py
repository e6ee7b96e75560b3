"""Built-in pattern packs: TOML data, loaded by harvester.patterns."""
