"""``train.init_from``: a trial starts from the weights of a trained model of the same
architecture (a qsweep checkpoint folder or its state.pt), e.g. QAT fine-tuning of an
FP32 trial. Errors name the field.

Example::

    load_initial_weights(model, "ray_results/sweep/trial_1/checkpoint_000002")
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainables.config import ConfigError
from trainables.sessions import STATE_FILE

__all__ = ["read_initial_weights", "load_initial_weights"]


def read_initial_weights(source: str) -> dict[str, torch.Tensor]:
    """The model weights ``train.init_from`` names: a checkpoint folder's state.pt, or
    such a file (``torch.load(weights_only=True)``); errors name the field."""
    path = Path(source).expanduser()
    state_file = path / STATE_FILE if path.is_dir() else path
    if not state_file.is_file():
        raise ConfigError(f"train.init_from={source!r} is invalid: allowed a checkpoint "
                          f"folder holding {STATE_FILE}, or such a file (none at {state_file})")
    try:
        state = torch.load(state_file, weights_only=True, map_location="cpu")
    except Exception as error:  # a damaged or foreign file: say which
        raise ConfigError(f"train.init_from={source!r} is invalid: {state_file} is not a "
                          f"readable checkpoint ({type(error).__name__}: {error})") from None
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor)
                                                for v in weights.values()):
        raise ConfigError(f"train.init_from={source!r} is invalid: {state_file} holds no "
                          "'model' weights (allowed a qsweep checkpoint)")
    return weights


def load_initial_weights(model: nn.Module, source: str) -> None:
    """``train.init_from``: the model weights of a checkpoint folder or state file of the
    same architecture (strict: every tensor, same shapes), errors naming the field."""
    weights = read_initial_weights(source)
    ours = model.state_dict()
    missing, extra = sorted(set(ours) - set(weights)), sorted(set(weights) - set(ours))
    shapes = [k for k in ours if k in weights and weights[k].shape != ours[k].shape]
    if missing or extra or shapes:
        problems = [f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                    for what, keys in (("missing", missing), ("unexpected", extra),
                                       ("other shapes", shapes)) if keys]
        qat = any(".parametrizations." in k for k in extra)
        raise ConfigError(f"train.init_from={source!r} is invalid: its weights are not this "
                          f"model's ({'; '.join(problems)}); allowed a checkpoint of the same "
                          "model.* architecture and dataset" +
                          (", from a float trial (this one is a QAT trial's, whose weights "
                           "are parametrized)" if qat else ""))
    model.load_state_dict(weights)
