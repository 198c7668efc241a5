"""Per-round evaluation: pairwise win rates (raw and length-controlled) against the starting model
and the previous round by a fixed judge, verifiable instruction following (IFEval-style), and the
reliability of the policy as a judge. Knobs: ``conf/eval/default.yaml``.

What a recipe uses (``from orchestrator import eval as evaluation``): ``roles(cfg)``, the fixed
judge's worker role; ``preflight(cfg, train_prompts)``, refusing held-out prompts among the
training prompts before the first round; ``evaluate(rnd)``, the end-of-round hook. The modules:
config.py (checks on the section, run by ``orchestrator.config.validate``), generations.py (prompt
sets, overlap, cached answers), compare.py (pairwise comparisons, win rates, agreement), stage.py
(one round's eval, given its workers), loop.py (the hook), cli.py (``orchestrate-eval``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.eval.generations import preflight
    from orchestrator.eval.loop import evaluate, roles

__all__ = ["evaluate", "preflight", "roles"]

_EXPORTS = {"evaluate": "loop", "preflight": "generations", "roles": "loop"}


def __getattr__(name: str) -> Any:
    # Imported on first use: the hook needs the controller (Ray, MLflow), which orchestrate-report
    # and the config checks, importing other eval modules, should not pay for.
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
