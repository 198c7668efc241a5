"""Per-round evaluation: pairwise win rates (raw and length-controlled) against the starting model
and the previous round by a fixed judge, verifiable instruction following (IFEval-style), and the
reliability of the policy as a judge. See ``stage.py`` for the stage and ``conf/eval/default.yaml``
for the knobs. Submodules import lazily: ``from orchestrator.eval.stage import run_eval``.
"""
