"""flexslim.data: datasets as tensors on the training device.

Modules: `tensors` (Dataset, StreamedDataset, the D_t/D_s split, batch iterators), `sources` (the dataset names ->
their loaders: digits, CIFAR-10, image folders, synthetic), `augment` (batched augmentation), `folders` (image
folders, in memory or streamed), `synthetic` (CIFAR-shaped random data).

May import: recipe, errors. Independent of system and models. Imported by train and above.
"""
