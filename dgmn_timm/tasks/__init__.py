""" Dense-prediction tasks on the models: torchvision detectors, semantic-segmentation heads. """
