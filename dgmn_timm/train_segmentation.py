""" `python -m dgmn_timm.train_segmentation`: Train and evaluate a DGMN2 semantic segmentation model (Semantic FPN or FCN) on image / mask folders (the code is in `dgmn_timm.tools.train_segmentation`). """
import runpy

if __name__ == '__main__':
    runpy.run_module('dgmn_timm.tools.train_segmentation', run_name='__main__', alter_sys=True)
