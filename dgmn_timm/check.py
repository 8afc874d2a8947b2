""" `python -m dgmn_timm.check`: does this machine run DGMN's op right and fast? Versions, kernels, the op against its float64 oracle, a timing (the code is in `dgmn_timm.tools.check`). """
import runpy

if __name__ == '__main__':
    runpy.run_module('dgmn_timm.tools.check', run_name='__main__', alter_sys=True)
