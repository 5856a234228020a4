"""``python -m gateway``: the same as ``relais gateway``."""

from __future__ import annotations

import sys

from cli.main import main

if __name__ == "__main__":
    sys.exit(main(["gateway", *sys.argv[1:]]))
