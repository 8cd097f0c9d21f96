"""flexslim.search: Algorithm 1 of FlexCHarts and what it works on.

Modules: `loop` (the first-order search loop, budget controller, per-epoch history), `state` (SearchState, a fresh
one, and its checkpoint search_state.pt that --resume reads), `supernet` (the family network with a mask at every
searched stage), `masks` (the Mask contract: Gaussian, Gumbel), `methods` (resolving a method name to its mask
factory), `bake` (searched widths -> the measured network that is delivered), `desk` (what the bake measures,
screens and re-times, logged), `capability` (a candidate's D_s accuracy with the supernet's weights).

May import: train, latency, system, data, models, recipe, errors. Independent of deploy. Imported by jobs and above.
"""
