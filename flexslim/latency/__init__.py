"""flexslim.latency: what a network costs on the deployment runtime.

Modules: `budget` (the Budget value: limit, window, headroom), `model` (the latency model: fit, predict, persist),
`profiling` (what to measure: probe, box, near-budget samples, whole networks in fresh sessions), `runtime`
(onnxruntime sessions and the timing statistic; re-exports the helper), `isolated` (the isolated timing helper
process: run_isolated, the pool, HELPER_GRACE), `cache` (every network timed, per device fingerprint: read before
timing, never by the gate), `fingerprint` (the cache's key: the device fingerprint and the graph hash of an ONNX
model without its weights).

May import: system, data, models, recipe, errors. Independent of train. Imported by search, deploy and above.
"""
