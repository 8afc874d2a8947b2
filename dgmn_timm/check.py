""" `python -m dgmn_timm.check` or `dgmn-check`: does this machine run DGMN's op right and fast? Versions, kernels, the op against its float64 oracle, a timing (the code is in `dgmn_timm.tools.check`). """
import runpy

CODE = 'dgmn_timm.tools.check'  # the module with build_parser() and main()


def cli():
    """ The console script: runs ``CODE`` as ``__main__``, which exits with its status (2 for a usage error). """
    runpy.run_module(CODE, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
    cli()
