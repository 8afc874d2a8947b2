""" `python -m dgmn_timm.benchmark`: Throughput and peak memory of DGMN2 side by side with timm's peers, in one process (the code is in `dgmn_timm.tools.benchmark`). """
import runpy

if __name__ == '__main__':
    runpy.run_module('dgmn_timm.tools.benchmark', run_name='__main__', alter_sys=True)
