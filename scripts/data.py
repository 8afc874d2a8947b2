#!/usr/bin/env python3
""" Same as `python -m dgmn_timm.data` (for a checkout). """
import runpy

runpy.run_module('dgmn_timm.data', run_name='__main__', alter_sys=True)
