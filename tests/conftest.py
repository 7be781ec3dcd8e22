import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


@pytest.fixture
def chosen_sizes(monkeypatch):
    """`chosen_sizes()` returns a list of the batch sizes of the steps the automatic
    Fisher batch chooses from then on (it fills as `fisher_diagonal` runs): the steps
    that run, not every step counted (`diagonal.automatic_step`, either backend)."""
    from keras_ewc.fisher import diagonal

    def start():
        chosen, choose = [], diagonal.automatic_step

        def spy(*args, **kwargs):
            step = choose(*args, **kwargs)
            chosen.append(step.batch_size)
            return step

        monkeypatch.setattr(diagonal, "automatic_step", spy)
        return chosen

    return start
