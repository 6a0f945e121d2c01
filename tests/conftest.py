import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads large models or runs for more than 30 s")


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct default, loaded once per session (fp32)."""
    from lorart.models import default_model_path, load_model
    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return load_model(path, dtype=torch.float32, cache=False)  # always test the GGUF path
