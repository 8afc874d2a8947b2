""" `python -m dgmn_timm.visualize_sampling` or `dgmn-visualize-sampling`: Draw the nodes a query samples: DGMN2 (last block of each stage, paper Fig. 11 style) or RepGraph (Fig. 6) (the code is in `dgmn_timm.tools.visualize_sampling`). """
import runpy

CODE = 'dgmn_timm.tools.visualize_sampling'  # the module with build_parser() and main()


def cli():
    """ The console script: runs ``CODE`` as ``__main__``, which exits with its status (2 for a usage error). """
    runpy.run_module(CODE, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
    cli()
