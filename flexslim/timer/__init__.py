"""flexslim.timer: the remote timer that runs on the deployment device (`flexslim timer serve`, or
`python -m flexslim.timer serve` where only onnxruntime and numpy are installed).

Modules: `server` (the HTTP server: token, limits, the queue, one measurement at a time in the helper process),
`__main__` (its command line without typer). The client side, which every job uses through `--timer URL`, is
`flexslim.latency.remote`; what both exchange is `flexslim.latency.wire`.

May import: latency, recipe, errors (never torch or onnx). Imported by cli.
"""
