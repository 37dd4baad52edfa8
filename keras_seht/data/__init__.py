"""Data loaders for the keras-seht examples and demo.

Loaders import their third-party dependencies lazily, inside the function,
so that importing ``keras_seht`` never pulls them in.
"""

from keras_seht.data.digits import load_digits

__all__ = ["load_digits"]
