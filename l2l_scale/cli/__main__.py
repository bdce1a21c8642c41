"""``python -m l2l_scale.cli``: the same as the ``l2l-scale`` console script."""

import sys

from l2l_scale.cli import main

sys.exit(main())
