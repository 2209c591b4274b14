import pytest
import torch

from equivalence import CPU_CONFIG
from models import GPT


@pytest.fixture(scope="session")
def weights():
    """The CPU tests' model weights (``equivalence.CPU_CONFIG``), seeded."""
    torch.manual_seed(0)
    return GPT(CPU_CONFIG).state_dict()
