#!/usr/bin/env python3
""" Same as `python -m dgmn_timm.visualize_sampling` (for a checkout). """
import runpy

runpy.run_module('dgmn_timm.visualize_sampling', run_name='__main__', alter_sys=True)
