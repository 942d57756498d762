"""Thin entry point mirroring ``diffswap-igfi swap`` (for scripts that prefer a file path).

    python infer/swap.py -s source.jpg -t target.jpg -o out.png [--checkpoint DIR ...]
"""

import sys

from diffswap_igfi.cli import main

if __name__ == "__main__":
    sys.exit(main(["swap", *sys.argv[1:]]))
