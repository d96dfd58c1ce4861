"""RULER (Hsieh et al. 2024): its 13 synthetic tasks on RULER's own data (generate.py runs its generator scripts),
prompts and metrics (protocol.py); `task=ruler` is task.py."""

from longctx.tasks.ruler.task import Ruler

__all__ = ["Ruler"]
