#!/usr/bin/env python3
""" Same as `python -m dgmn_timm.check` (for a checkout). """
import runpy

runpy.run_module('dgmn_timm.check', run_name='__main__', alter_sys=True)
