"""``python -m femd``."""

from femd.cli import main

raise SystemExit(main())
