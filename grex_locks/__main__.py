"""``python -m grex_locks``: the ``grex-locks`` command line."""

from grex_locks.cli import main

raise SystemExit(main())
