""" `python -m dgmn_timm.count_macs`: Parameters and GMACs of DGMN models next to the paper's figures (the code is in `dgmn_timm.tools.count_macs`). """
import runpy

if __name__ == '__main__':
    runpy.run_module('dgmn_timm.tools.count_macs', run_name='__main__', alter_sys=True)
