""" Weights: the checkpoint reader, the Hugging Face Hub, conversion of the authors' checkpoints. """
