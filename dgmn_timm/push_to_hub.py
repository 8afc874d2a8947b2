""" `python -m dgmn_timm.push_to_hub`: publish a converted folder to the Hugging Face Hub (the code is in `dgmn_timm.weights.hub`). """
import runpy

if __name__ == '__main__':
    runpy.run_module('dgmn_timm.weights.hub', run_name='__main__', alter_sys=True)
