"""Optimizers as ``torch.optim`` classes, built by name.

Importable without Ray or MLflow. The multiplicative family (EG, EG+-, AdamEG, Madam,
LNS-Madam) lands with the optimizers issue; today the registry holds the additive
baselines that the training loop needs.

Example::

    import torch, optim
    model = torch.nn.Linear(4, 2)
    opt = optim.build("sgd", model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
"""

from optim.registry import available, build, register

__all__ = ["available", "build", "register"]
