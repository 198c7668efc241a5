"""Checkpoint transforms: run after a round's training, each builds (and may promote) named
checkpoints of the round. Chosen with ``transforms=[name,...]``; each ``conf/transforms/NAME.yaml``
puts its keys under ``transform.NAME`` and names its class with ``_target_`` (orchestrator/plugins.py).

- ``expo`` (orchestrator/transforms/expo.py): ExPO model extrapolation, alpha chosen on dev prompts.
"""
