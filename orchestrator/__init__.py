"""selfplay-orchestrator: iterative self-improvement of LLMs in rounds, on Ray, tracked in MLflow."""

__version__ = "0.1.0"
