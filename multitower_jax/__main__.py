from multitower_jax.cli import entry

raise SystemExit(entry())
