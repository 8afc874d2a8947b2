#!/usr/bin/env python3
""" Same as `python -m dgmn_timm.push_to_hub` (for a checkout). """
import runpy

runpy.run_module('dgmn_timm.push_to_hub', run_name='__main__', alter_sys=True)
