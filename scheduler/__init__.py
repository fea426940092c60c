"""The scheduler: filter and score plugins over recorded inputs, so every decision replays."""

from scheduler.engine import SCHEDULER_VERSION, Plugin, SchedulingError, decide, prefilter, profile, rejections
from scheduler.plugins import BUILTIN, ENTRY_POINT_GROUP, available, resolve

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "SCHEDULER_VERSION", "Plugin", "SchedulingError", "available", "decide",
           "prefilter", "profile", "rejections", "resolve"]
