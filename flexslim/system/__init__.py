"""flexslim.system: process-level services every job uses.

Modules: `files` (atomic writes, JSONL, content hashes), `runs` (run folders, `runs/latest`, RunRecord = run.json),
`locks` (run-folder locks), `console` (the Reporter), `plots` (PNG figures), `exits` (exception -> exit code + one
line), `devices` (the training device), `distributed` (torchrun), `memory` (memory readings),
`children` (child processes that die with their parent).

May import: recipe, errors. Independent of data and models. Imported by everything above it.
"""
