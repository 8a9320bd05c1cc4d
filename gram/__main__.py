import sys

from gram.cli import main

sys.exit(main())
