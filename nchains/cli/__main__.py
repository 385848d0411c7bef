"""``python -m nchains.cli``: the same as the ``nchains`` command."""

import sys

from nchains.cli.main import main

sys.exit(main())
