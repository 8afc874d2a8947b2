""" Deprecated: the scripts' helpers now live in ``dgmn_timm.data`` (data) and ``dgmn_timm.engine``
(run folders, threads, devices, files, training). This module re-exports them for one release;
``python -m dgmn_timm.train_utils ROOT`` still writes the digits set (use ``python -m dgmn_timm.data``).
"""
import warnings

from timm.utils import random_seed as seed_everything  # noqa: F401

from .data import *  # noqa: F401,F403
from .data import main as _main
from .engine import *  # noqa: F401,F403

warnings.warn('dgmn_timm.train_utils is deprecated; import from dgmn_timm.data and dgmn_timm.engine',
              DeprecationWarning, stacklevel=2)

if __name__ == '__main__':
    _main()
