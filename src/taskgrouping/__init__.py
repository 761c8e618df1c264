"""taskgrouping: which tasks should be learned together, and how."""

__version__ = "0.1.0"
