#!/usr/bin/env python3
""" Upload a converted folder (scripts/convert_official.py) to a Hugging Face Hub model repo.

    python scripts/push_to_hub.py dgmn2_tiny.in1k --repo-id dgmn-timm/dgmn2_tiny.in1k --dry-run
    python scripts/push_to_hub.py dgmn2_tiny.in1k --repo-id dgmn-timm/dgmn2_tiny.in1k

The folder is verified first (config names a registered architecture, the weights load into it, and a
registered Hub id only takes its own architecture). The token comes from the usual huggingface_hub places
(HF_TOKEN, `hf auth login`). --dry-run prints exactly the files that would be uploaded, without network.
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
    parser.add_argument('folder', help='converted folder (model.safetensors, config.json, README.md)')
    parser.add_argument('--repo-id', required=True, help='Hub repo, ORG/NAME')
    parser.add_argument('--private', action='store_true', help='create the repo as private (if it does not exist)')
    parser.add_argument('--revision', default=None, help='branch to commit to (default: main)')
    parser.add_argument('--commit-message', default=None)
    parser.add_argument('--dry-run', action='store_true', help='print what would be uploaded; no network')
    parser.add_argument('--no-verify', action='store_true', help='skip loading the folder before the upload')
    args = parser.parse_args(argv)
    try:
        hub.push_folder(
            args.folder, args.repo_id, private=args.private, revision=args.revision,
            commit_message=args.commit_message, dry_run=args.dry_run, verify=not args.no_verify)
    except (hub.PretrainedWeightsError, FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
