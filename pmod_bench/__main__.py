import sys

from pmod_bench.cli import main

sys.exit(main())
