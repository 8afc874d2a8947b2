#!/usr/bin/env python3
""" Convert an authors' released DGMN checkpoint into a Hugging Face Hub folder in timm's format.

    python scripts/convert_official.py dgmn2_tiny.pth --model dgmn2_tiny --output-dir dgmn2_tiny.in1k
    python scripts/convert_official.py dgmn2_tiny.pth --model dgmn2_tiny --output-dir dgmn2_tiny.in1k --to-cache
    python scripts/convert_official.py retinanet_dgmn2_tiny.pth --model dgmn2_tiny --output-dir dgmn2_tiny.coco

The checkpoint is read with torch.load(weights_only=True) (only argparse.Namespace allowed besides
tensors), mapped strictly to the model, checked with a forward pass, and written as model.safetensors,
config.json and a README.md model card. Detection / segmentation checkpoints ('backbone.'-prefixed, no
head) give a backbone-only folder (num_classes 0). --to-cache also places the folder in the local Hugging
Face cache (HF_HUB_CACHE / HF_HOME) under the model's hf_hub_id, so that
timm.create_model('dgmn2_tiny.in1k', pretrained=True) works offline (HF_HUB_OFFLINE=1).
"""
import argparse
import sys
from pathlib import Path

try:
    import dgmn_timm.hub as hub
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import dgmn_timm.hub as hub


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='\n'.join(__doc__.strip().splitlines()[1:]))
    parser.add_argument('checkpoint', help="the authors' released .pth file")
    parser.add_argument('--model', required=True, help="registered model name, optionally with tag (dgmn2_tiny.in1k)")
    parser.add_argument('--output-dir', required=True, help='folder to write (empty or absent)')
    parser.add_argument('--tag', default=None, help="pretrained tag (default: from --model, else 'in1k', or "
                                                    "'backbone' for checkpoints without head)")
    parser.add_argument('--use-ema', action='store_true',
                        help="convert the EMA weights ('model_ema') instead of 'model'")
    parser.add_argument('--check-size', type=int, default=224, help='image size of the sanity-check forward pass')
    parser.add_argument('--to-cache', action='store_true', help='also place the folder into the local HF cache')
    parser.add_argument('--repo-id', default=None, help="Hub id for the cache and model card (default: the model's "
                                                        "registered hf_hub_id)")
    parser.add_argument('--cache-dir', default=None, help='Hugging Face cache (default: HF_HUB_CACHE / HF_HOME)')
    parser.add_argument('--overwrite', action='store_true', help='replace the files of an existing output folder')
    args = parser.parse_args(argv)
    try:
        hub.convert_checkpoint(
            args.checkpoint, args.model, args.output_dir, tag=args.tag, use_ema=args.use_ema,
            check_size=args.check_size, to_cache=args.to_cache, repo_id=args.repo_id, cache_dir=args.cache_dir,
            overwrite=args.overwrite, verbose=True)
    except (hub.PretrainedWeightsError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
