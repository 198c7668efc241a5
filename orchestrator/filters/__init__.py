"""Pair filters: plug-ins between pairing and training (see orchestrator/plugins.py).

Each module holds one filter class, called as ``filter(ctx, pairs) -> (kept, metrics)``; each
config file in ``conf/filters/`` names its class with ``_target_``. A filter may set a pair's
``weight`` / ``epsilon`` for the trainer and should say in ``pair.meta`` why a pair was kept.
"""
