""" `python -m dgmn_timm.convert`: Convert an authors' released DGMN checkpoint into a Hugging Face Hub folder in timm's format (the code is in `dgmn_timm.weights.convert`). """
import runpy

if __name__ == '__main__':
    runpy.run_module('dgmn_timm.weights.convert', run_name='__main__', alter_sys=True)
