"""Thin entry point mirroring ``diffswap-igfi conditions``.

    python infer/conditions.py -s source.jpg -t target.jpg --save-debug conditions.png
"""

import sys

from diffswap_igfi.cli import main

if __name__ == "__main__":
    sys.exit(main(["conditions", *sys.argv[1:]]))
