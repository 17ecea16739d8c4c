import pytest
from t2i_nb.data import make_synth_birds


@pytest.fixture(scope="session")
def synth_birds(tmp_path_factory):
    "A small SynthBirds build shared by the tests of a session."
    return make_synth_birds(tmp_path_factory.mktemp("sb"), n_train=120, n_test=40, progress=False)
