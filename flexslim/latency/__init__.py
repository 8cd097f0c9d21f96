"""flexslim.latency: what a network costs on the deployment runtime.

Modules: `budget` (the Budget value: limit, window, headroom), `model` (the latency model: fit, predict, persist),
`profiling` (what to measure: probe, box, near-budget samples, whole networks in fresh sessions), `sessions`
(onnxruntime sessions on the provider asked for, and the provider that ran), `runtime` (timing a session; re-exports
the sessions, the statistic and the helper), `statistic` (the undisturbed windows, the percentile's interval, when
timing may stop), `isolated` (the isolated timing helper process: run_isolated, the pool, HELPER_GRACE), `cache`
(every network timed, per device fingerprint: read before timing, never by the gate), `store` (the cache's files
and entries, and when an entry may answer), `fingerprint` (the cache's keys: the device fingerprint, the graph hash
of an ONNX model without its weights, the network's description with the code that exports it; the device that
measures: this machine or the remote timer's), `remote` (the remote timer's client: every measurement of a job made
on the deployment device, `--timer URL`), `wire` (what the client and the timer exchange, checked both ways).

May import: system, data, models, recipe, errors. Independent of train. Imported by search, deploy and above.
"""
