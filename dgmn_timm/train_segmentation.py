""" `python -m dgmn_timm.train_segmentation` or `dgmn-train-segmentation`: Train and evaluate a DGMN2 semantic segmentation model (Semantic FPN or FCN) on image / mask folders (the code is in `dgmn_timm.tools.train_segmentation`). """
import runpy

CODE = 'dgmn_timm.tools.train_segmentation'  # the module with build_parser() and main()


def cli():
    """ The console script: runs ``CODE`` as ``__main__``, which exits with its status (2 for a usage error). """
    runpy.run_module(CODE, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
    cli()
