"""`python3 -m mmproxy` is the same as the `mmproxy` command."""

import sys

from mmproxy.cli import main

sys.exit(main())
