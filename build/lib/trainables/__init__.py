"""Data, models and the training loop (in-process, Ray Tune, or Ray Train DDP).

Example::

    from trainables import TrialConfig, LocalSession, run_trial
    history = run_trial(TrialConfig(), LocalSession())
"""

from trainables.config import ConfigError, TrialConfig
from trainables.loop import run_trial
from trainables.sessions import LocalSession

__all__ = ["ConfigError", "LocalSession", "TrialConfig", "run_trial"]
