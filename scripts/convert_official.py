#!/usr/bin/env python3
""" Alias of ``python -m dgmn_timm.convert`` (kept for one release): convert an authors' released checkpoint. """
import sys
from pathlib import Path

try:
    from dgmn_timm.convert import main
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dgmn_timm.convert import main

if __name__ == '__main__':
    sys.exit(main())
