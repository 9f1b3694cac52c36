"""tokenforge: data.

Datasets and DataModules, one job per module (imported on demand, so ``import data`` stays light):

- ``data.images.ImageDataModule``: ``fashion_mnist``, ``emoji`` or any image ``folder``
- ``data.sequence.SequenceDataModule``: 1-D sequences, the generated ``sines`` or a user's ``.npz``
- ``data.deepmimic.MotionDataModule``: humanoid motion windows synthesised from the DeepMimic clips
  (``data.humanoid``: skeleton and FK; ``data.motion_features``: the window representation)
- ``data.split``: the split views and loaders every in-memory DataModule shares
- ``data.fashion_mnist.FashionMNIST``, ``data.emoji.Emoji``, ``data.image_folder.ImageFolder``
- ``data.codes``: the code-file format (``CodeWriter``, ``CodeDataset``, ``CodesDataModule``)
- ``data.cache``: the atomic, parameter-keyed array cache for decoded/generated datasets
"""
