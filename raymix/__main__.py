import sys

from raymix.cli import main

sys.exit(main())
