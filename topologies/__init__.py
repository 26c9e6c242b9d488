"""Built-in cluster topologies (TOML data); shipped inside the wheel as clustersim.builtin_topologies."""
