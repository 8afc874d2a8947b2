""" `python -m dgmn_timm.push_to_hub` or `dgmn-push-to-hub`: publish a converted folder to the Hugging Face Hub (the code is in `dgmn_timm.weights.hub`). """
import runpy

CODE = 'dgmn_timm.weights.hub'  # the module with build_parser() and main()


def cli():
    """ The console script: runs ``CODE`` as ``__main__``, which exits with its status (2 for a usage error). """
    runpy.run_module(CODE, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
    cli()
