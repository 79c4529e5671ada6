"""``python -m lisa_kit``: the ``lisa-kit`` command line."""
from lisa_kit.cli import main

raise SystemExit(main())
