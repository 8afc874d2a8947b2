""" Dynamic Graph Message Passing networks as timm models.

``import dgmn_timm`` registers every model with timm, so that
``timm.create_model('dgmn2_tiny', ...)`` works, and routes timm's weight loading for these
models through ``dgmn_timm.weights.checkpoints`` (one reader, one clear error per bad file).
"""
from .models import *  # noqa: F401,F403  (registers the models with timm)
from .weights.checkpoints import (
    CheckpointError, CheckpointMismatchError, CheckpointNotFoundError, install_timm_loaders, load_weights,
    read_state_dict,
)

install_timm_loaders()

__version__ = '0.1.0'
