"""Allow `python -m harvester`."""

from harvester.cli import main

raise SystemExit(main())
