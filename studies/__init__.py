"""Ray entry points of the dualssl study (the only place in the project that imports Ray).

``tune.py`` (CLI) -> ``trainable.train_func`` (one Tune trial, the Ray Train driver) ->
``train_loop.train_loop_per_worker`` (``dualssl.engine.fit`` on each DDP worker) ->
``crosssite`` (best checkpoint on every unseen site) -> ``tracking`` (MLflow) -> ``export_best``.
"""
