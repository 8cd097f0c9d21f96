"""flexslim.deploy: what leaves flexslim and the gate it must pass.

Modules: `export` (torch -> checked ONNX with parity and provenance metadata), `report` (Check, Report: the
verdict and its files), `gate` (latency + accuracy of ANY ONNX classifier -> a Report; `flexslim.validate`), and
what the gate reads: `settings` (where each measurement setting may come from: flags, the model's metadata, defaults;
values that would loosen the gate are refused; `Measurement`) and `outputs` (one finite (N, classes) output; accuracy).

May import: train, latency, system, data, models, recipe, errors. Independent of search. Imported by jobs and above.
"""
