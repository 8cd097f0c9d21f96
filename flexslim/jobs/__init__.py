"""flexslim.jobs: the jobs that own a run folder, as named stages over one run record.

Modules: `search` (the main job: latency model -> search -> bake -> retrain), `latency` (the run's latency model,
its budget, `profile`), `export` (a run's model -> ONNX -> the gate), `train` (retrain an arch or a run),
`sweep` (many budgets over one shared latency table).

May import: search, deploy, train, latency, system, data, models, recipe, errors. Imported by bench and cli.
"""
