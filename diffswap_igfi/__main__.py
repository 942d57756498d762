import sys

from diffswap_igfi.cli import main

sys.exit(main())
