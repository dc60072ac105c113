from multitower_jax.cli import main

raise SystemExit(main())
