""" `python -m dgmn_timm.convert` or `dgmn-convert`: Convert an authors' released DGMN checkpoint into a Hugging Face Hub folder in timm's format (the code is in `dgmn_timm.weights.convert`). """
import runpy

CODE = 'dgmn_timm.weights.convert'  # the module with build_parser() and main()


def cli():
    """ The console script: runs ``CODE`` as ``__main__``, which exits with its status (2 for a usage error). """
    runpy.run_module(CODE, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
    cli()
