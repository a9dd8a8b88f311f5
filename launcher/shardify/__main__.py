"""``python -m launcher.shardify SRC`` = the ``shardify`` command."""

import sys

from launcher.shardify.cli import main

sys.exit(main())
