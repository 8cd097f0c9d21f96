"""flexslim.bench: method comparison - every method run alike on one recipe, data, latency table and seeds.

Modules: `run` (the bench job: runs, seeds, the shared latency table, launching the workers), `worker` (one
isolated per-method run in its own process -> its row), `report` (statistics over seeds, verdicts, table, CSV,
figure), `uniform` (the uniform width-scaling baseline), `throughput` (step-time benchmark).

May import: jobs, search, deploy, train, latency, system, data, models, recipe, errors. Imported only by cli.
"""
