import sys

from minildm.cli import main

sys.exit(main())
