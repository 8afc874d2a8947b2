""" `python -m dgmn_timm.finetune` or `dgmn-finetune`: Fine-tune any registered timm model (DGMN2 included) on an ImageFolder tree (the code is in `dgmn_timm.tools.finetune`). """
import runpy

CODE = 'dgmn_timm.tools.finetune'  # the module with build_parser() and main()


def cli():
    """ The console script: runs ``CODE`` as ``__main__``, which exits with its status (2 for a usage error). """
    runpy.run_module(CODE, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
    cli()
