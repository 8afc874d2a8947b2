""" `python -m dgmn_timm.train_detection`: Train and evaluate a DGMN2 detector (RetinaNet, Faster R-CNN, Mask R-CNN) on a COCO-format dataset (the code is in `dgmn_timm.tools.train_detection`). """
import runpy

if __name__ == '__main__':
    runpy.run_module('dgmn_timm.tools.train_detection', run_name='__main__', alter_sys=True)
