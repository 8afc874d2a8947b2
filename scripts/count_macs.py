#!/usr/bin/env python3
""" Same as `python -m dgmn_timm.count_macs` (for a checkout). """
import runpy

runpy.run_module('dgmn_timm.count_macs', run_name='__main__', alter_sys=True)
