"""flexslim.train: training the dense network.

Modules: `loop` (one epoch, evaluation, BatchNorm recalibration, `fit` with exact resume), `checkpoint` (the
per-epoch metrics, the resumable train state, model.pt save/load), `schedules` (cosine lr, drop-path ramp).

May import: system, data, models, recipe, errors. Independent of latency. Imported by search and above.
"""
