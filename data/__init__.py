"""tokenforge: data.

Datasets and DataModules, one job per module (imported on demand, so ``import data`` stays light):

- ``data.images.ImageDataModule``: ``fashion_mnist``, ``emoji`` or any image ``folder``
- ``data.fashion_mnist.FashionMNIST``, ``data.emoji.Emoji``, ``data.image_folder.ImageFolder``
- ``data.codes``: the code-file format (``CodeWriter``, ``CodeDataset``, ``CodesDataModule``)
- ``data.cache``: the atomic, parameter-keyed array cache for decoded/generated datasets
"""
