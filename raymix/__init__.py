"""raymix: self-supervised vision encoders trained with similarity-modelling contrastive
methods, with hyperparameters searched on Ray. ``import raymix`` does not import Ray."""

__version__ = "0.1.0"
