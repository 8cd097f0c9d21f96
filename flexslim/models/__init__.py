"""flexslim.models: networks as data and how to build them.

Modules: `arch` (Arch, the versioned arch.json), `families` (family name -> its module; build_network, cost_terms),
`spaces/` (the families: resnet, darts, torchvision resnet/mobilenet), `transplant` (copy overlapping weights across
widths), `pretrained` (start from a checkpoint of other widths), `onnx_graph` (a network -> ONNX bytes).

May import: recipe, errors. Independent of system and data; never imports a loop. Imported by train and above.
"""
