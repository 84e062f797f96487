import pytest

from parhelpers import make_pdata


@pytest.fixture(scope="session")
def pdata(tmp_path_factory):
    return make_pdata(tmp_path_factory.mktemp("pdata"))
