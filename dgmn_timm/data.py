""" `python -m dgmn_timm.data` or `dgmn-data`: Data for the scripts: ImageFolder trees, image lists, image / mask pairs, the toy digits set (the code is in `dgmn_timm.tools.data`). """
import runpy

CODE = 'dgmn_timm.tools.data'  # the module with build_parser() and main()


def cli():
    """ The console script: runs ``CODE`` as ``__main__``, which exits with its status (2 for a usage error). """
    runpy.run_module(CODE, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
    cli()
