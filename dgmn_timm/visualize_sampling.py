""" `python -m dgmn_timm.visualize_sampling`: Draw the nodes a query samples: DGMN2 (last block of each stage, paper Fig. 11 style) or RepGraph (Fig. 6) (the code is in `dgmn_timm.tools.visualize_sampling`). """
import runpy

if __name__ == '__main__':
    runpy.run_module('dgmn_timm.tools.visualize_sampling', run_name='__main__', alter_sys=True)
