""" `python -m dgmn_timm.benchmark` or `dgmn-benchmark`: Throughput and peak memory of DGMN2 side by side with timm's peers, in one process (the code is in `dgmn_timm.tools.benchmark`). """
import runpy

CODE = 'dgmn_timm.tools.benchmark'  # the module with build_parser() and main()


def cli():
    """ The console script: runs ``CODE`` as ``__main__``, which exits with its status (2 for a usage error). """
    runpy.run_module(CODE, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
    cli()
