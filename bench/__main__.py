import sys

from darkspec.bench.cli import main

sys.exit(main())
