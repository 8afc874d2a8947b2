""" Dynamic Graph Message Passing networks as timm models.

``import dgmn_timm`` registers every model (and the sampled-attention op) with timm, so that
``timm.create_model('dgmn2_tiny', ...)`` works; it changes no function of timm, torch or huggingface_hub.
Weight files load with timm's own routes, or with ``load_weights`` / ``read_state_dict`` (one safe reader,
one clear error per bad file).
"""
from .models import *  # noqa: F401,F403  (registers the models with timm)
from .errors import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError
from .weights.checkpoints import load_weights, read_state_dict

__version__ = '0.1.0'
