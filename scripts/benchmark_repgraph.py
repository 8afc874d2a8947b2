#!/usr/bin/env python3
""" Same as `python -m dgmn_timm.tools.benchmark_repgraph` (for a checkout). """
import runpy

runpy.run_module('dgmn_timm.tools.benchmark_repgraph', run_name='__main__', alter_sys=True)
