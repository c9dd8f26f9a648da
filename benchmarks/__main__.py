"""python -m benchmarks → benchmarks.cli.main()."""

from benchmarks.cli import main

raise SystemExit(main())
