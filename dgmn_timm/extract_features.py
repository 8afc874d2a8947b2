""" `python -m dgmn_timm.extract_features`: Extract per-image features with any registered timm model (DGMN2 included) (the code is in `dgmn_timm.tools.extract_features`). """
import runpy

if __name__ == '__main__':
    runpy.run_module('dgmn_timm.tools.extract_features', run_name='__main__', alter_sys=True)
