""" `python -m dgmn_timm.data`: Data for the scripts: ImageFolder trees, image lists, image / mask pairs, the toy digits set (the code is in `dgmn_timm.tools.data`). """
import runpy

if __name__ == '__main__':
    runpy.run_module('dgmn_timm.tools.data', run_name='__main__', alter_sys=True)
