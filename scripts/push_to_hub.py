#!/usr/bin/env python3
""" Alias of ``python -m dgmn_timm.hub`` (kept for one release): upload a converted folder to the Hub. """
import sys
from pathlib import Path

try:
    from dgmn_timm.hub import main
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dgmn_timm.hub import main

if __name__ == '__main__':
    sys.exit(main())
