"""tokenforge: modalities — what each kind of data means to the rest of the project (one file each).

``get_modality(name)`` returns the :class:`~stage1.modalities.base.Modality` in ``stage1/modalities/<name>.py``;
the commands look it up from a tokenizer's code spec and never branch on the kind of data.
Implemented: ``image`` (``image.py``), ``sequence`` (``sequence.py``), ``motion`` (``motion.py``),
``actions`` (``actions.py``).
"""

from stage1.modalities.base import Evaluator, Modality, available, get_modality, modality_of

__all__ = ["Evaluator", "Modality", "available", "get_modality", "modality_of"]
