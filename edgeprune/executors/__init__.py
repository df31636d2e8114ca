"""Where candidate builds run (base.py): in this process, or as tasks on a Ray cluster."""

from edgeprune.executors import ray_cluster  # noqa: F401 (registers the ray executor; Ray itself is imported when used)
from edgeprune.executors.base import Executor, InProcess, check_executor, open_executor
from edgeprune.executors.job import BuildContext, Built, CandidateJob, ContextSpec

__all__ = ["BuildContext", "Built", "CandidateJob", "ContextSpec", "Executor", "InProcess", "check_executor",
           "open_executor"]
