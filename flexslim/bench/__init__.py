"""flexslim.bench: method comparison - every method run alike on one recipe, data, latency table and seeds.

Modules: `run` (the bench job: runs, seeds, the shared latency table, launching the workers), `worker` (one
isolated per-method run in its own process -> its row; a searched method's row), `baselines` (the baselines' rows:
uniform scaling, random search, ceiling, prune, through the same bake and retraining), `report` (statistics over seeds, verdicts, table, CSV,
figure), `pareto` (several budgets), `uniform` (the uniform width-scaling baseline), `random_search`, `compute`
(images x MACs of a row's search and retraining), `mainjob` (the README job cold and warm), `throughput` (step-time
benchmark), `stopping` (what a timing that stops once it knows saves and reads against one in full).

May import: jobs, search, deploy, train, latency, system, data, models, recipe, errors. Imported only by cli.
"""
