"""``python -m lowbit_amp``: the same as the ``lowbit-amp`` console script."""

import sys

from lowbit_amp.cli import main

sys.exit(main())
