import sys

from explorer.surfaces.cli import main

sys.exit(main())
