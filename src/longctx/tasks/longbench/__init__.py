"""LongBench: the official protocol (protocol.py, metrics.py) on official data (data.py) or the built-in offline suite
(builtin.py); `task=longbench` is task.py, `task=longbench_v2` is v2.py."""

from longctx.tasks.longbench.task import LongBench
from longctx.tasks.longbench.v2 import LongBenchV2

__all__ = ["LongBench", "LongBenchV2"]
