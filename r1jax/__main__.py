from r1jax.cli import main

raise SystemExit(main())
