"""``python -m toyworld toy ...``: train, report and ship the embedded models (see :mod:`toyworld`)."""

import sys

from toyworld import main

sys.exit(main())
