"""`tf`: TensorFlow, imported when a module of keras_ewc first reads one of its names.

On the TensorFlow backend this is TensorFlow itself (Keras has imported it already); on
JAX, `import keras_ewc` and the JAX path (fitting, consolidating, the Fisher of arrays,
`.keras` files) never read it, so TensorFlow need not be installed, and is not imported
when it is. A name read caches itself on this module: the second read is a plain
attribute read, and the TensorFlow code of keras_ewc runs as if TensorFlow were
imported at the top of its modules.

>>> from keras_ewc._tensorflow import tf
>>> tf.__name__
'tensorflow'
"""

from __future__ import annotations

import types


class _LazyTensorFlow(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__") and name != "__version__":
            # Introspection (doctest finders, `inspect.unwrap`, copy) must not import it.
            raise AttributeError(name)
        try:
            import tensorflow
        except ImportError as error:
            raise ImportError(
                f"This feature of keras_ewc needs TensorFlow (it reads `tf.{name}`), which "
                f"cannot be imported: {error}. Install it (`pip install tensorflow`); on "
                "the JAX backend, fitting, consolidating, the Fisher of arrays and "
                "`.keras` files do not need it."
            ) from error
        value = getattr(tensorflow, name)
        setattr(self, name, value)
        return value


tf = _LazyTensorFlow("tensorflow")
