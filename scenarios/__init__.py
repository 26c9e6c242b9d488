"""Scenario files (TOML data) and the published-measurement cases; shipped inside the wheel as
clustersim.builtin_scenarios, so that `clustersim published` runs wherever the package is installed."""
