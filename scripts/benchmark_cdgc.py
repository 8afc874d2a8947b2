#!/usr/bin/env python3
""" Same as `python -m dgmn_timm.tools.benchmark_cdgc` (for a checkout). """
import runpy

runpy.run_module('dgmn_timm.tools.benchmark_cdgc', run_name='__main__', alter_sys=True)
