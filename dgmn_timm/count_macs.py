""" `python -m dgmn_timm.count_macs` or `dgmn-count-macs`: Parameters and GMACs of DGMN models next to the paper's figures (the code is in `dgmn_timm.tools.count_macs`). """
import runpy

CODE = 'dgmn_timm.tools.count_macs'  # the module with build_parser() and main()


def cli():
    """ The console script: runs ``CODE`` as ``__main__``, which exits with its status (2 for a usage error). """
    runpy.run_module(CODE, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
    cli()
