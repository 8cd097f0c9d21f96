"""flexslim.deploy: what leaves flexslim and the gate it must pass.

Modules: `export` (torch -> checked ONNX with parity and provenance metadata), `report` (Check, Report: the
verdict and its files), `gate` (latency + accuracy of ANY ONNX classifier -> a Report; `flexslim.validate`).

May import: train, latency, system, data, models, recipe, errors. Independent of search. Imported by jobs and above.
"""
