"""``python -m grex_locks``: the ``grex-locks`` command line."""

from ._cli.main import main

raise SystemExit(main())
