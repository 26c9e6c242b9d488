"""Built-in cluster topologies (TOML data); shipped inside the wheel as sim.builtin_topologies."""
