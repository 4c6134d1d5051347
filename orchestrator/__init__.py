"""orchestrator: distributed PyTorch training on Ray with tracking and fault tolerance built in."""

__version__ = "0.1.0"
