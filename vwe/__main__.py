import sys

from vwe.cli import main

sys.exit(main())
