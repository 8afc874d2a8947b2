""" `python -m dgmn_timm.finetune`: Fine-tune any registered timm model (DGMN2 included) on an ImageFolder tree (the code is in `dgmn_timm.tools.finetune`). """
import runpy

if __name__ == '__main__':
    runpy.run_module('dgmn_timm.tools.finetune', run_name='__main__', alter_sys=True)
