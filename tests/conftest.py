import os

import pytest
import torch

# Two cores are shared by the whole suite; deterministic single-process math keeps goldens stable.
torch.set_num_threads(min(2, os.cpu_count() or 1))

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def digits():
    from indistill.data import get_dataset

    return get_dataset("digits")


def require_fashion_mnist():
    if not os.path.isdir(FASHION_DIR):
        pytest.skip(f"Fashion-MNIST not found in {FASHION_DIR} (apt-get install dataset-fashion-mnist)")
