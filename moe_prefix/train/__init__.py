"""Training workflow: run configs, data, task networks, and one run loop for every task.

`fit(cfg)` trains one run and writes its run directory; `evaluate_run(run_dir)` scores it again.
Nothing in the core (`moe_prefix.*` at the top level) imports from here.
"""
