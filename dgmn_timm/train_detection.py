""" `python -m dgmn_timm.train_detection` or `dgmn-train-detection`: Train and evaluate a DGMN2 detector (RetinaNet, Faster R-CNN, Mask R-CNN) on a COCO-format dataset (the code is in `dgmn_timm.tools.train_detection`). """
import runpy

CODE = 'dgmn_timm.tools.train_detection'  # the module with build_parser() and main()


def cli():
    """ The console script: runs ``CODE`` as ``__main__``, which exits with its status (2 for a usage error). """
    runpy.run_module(CODE, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
    cli()
