"""flexslim.data: datasets as tensors on the training device.

Modules: `cachedir` (the user's cache folder, found without torch), `tensors` (the TrainingData protocol, Dataset,
StreamedDataset, the D_t/D_s split, batch iterators, the class-balanced subset), `digits` (scikit-learn's bundled
digits and its stratified split, read without importing scikit-learn), `sources` (the dataset table resolved:
digits, CIFAR-10, the IDX sets Fashion-MNIST / MNIST / KMNIST, image folders, synthetic), `augment` (batched
augmentation), `folders` (image folders, in memory or streamed), `synthetic` (CIFAR-shaped random data).

May import: recipe, errors. Independent of system and models. Imported by train and above.
"""
