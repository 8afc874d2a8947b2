""" `python -m dgmn_timm.extract_features` or `dgmn-extract-features`: Extract per-image features with any registered timm model (DGMN2 included) (the code is in `dgmn_timm.tools.extract_features`). """
import runpy

CODE = 'dgmn_timm.tools.extract_features'  # the module with build_parser() and main()


def cli():
    """ The console script: runs ``CODE`` as ``__main__``, which exits with its status (2 for a usage error). """
    runpy.run_module(CODE, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
    cli()
