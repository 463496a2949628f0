from sae_allocators.benchmark.cli import main

raise SystemExit(main())
