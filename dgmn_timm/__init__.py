""" Dynamic Graph Message Passing networks as timm models.

``import dgmn_timm`` registers every model with timm, so that
``timm.create_model('dgmn2_tiny', ...)`` works.
"""
import argparse

import torch

from .sampling import sample_nodes, sample_nodes_reference
from .models import *  # noqa: F401,F403  (registers the models with timm)

# The authors' released checkpoints are DeiT-style training dicts that carry an
# argparse.Namespace under 'args'. Allow exactly that class for torch.load(weights_only=True),
# so timm's own loaders (pretrained file, checkpoint_path) read them without full unpickling.
if hasattr(torch.serialization, 'add_safe_globals'):
    torch.serialization.add_safe_globals([argparse.Namespace])

__version__ = '0.1.0'
