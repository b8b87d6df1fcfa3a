import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread avoids spin-waiting on a busy 2-core CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread_per_test():
    """One torch thread again before each test: numba's parallel metrics (cache-mode
    validation) reset torch's OpenMP thread count."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llm():
    """``tiny.tiny_llm``: a random-weight LLaMA (hidden 32, 2 layers) as a ``LoadedLLM``."""
    from tiny import tiny_llm

    return tiny_llm()


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """The tiny prepared dataset of ``tiny.tiny_dataset`` (one per test module)."""
    from tiny import tiny_dataset

    return tiny_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(scope="module")
def sasrec_dir(ds, tmp_path_factory):
    """``tiny.tiny_sasrec`` for ``ds``, saved as a checkpoint folder."""
    from llmsrec.cfsrec import save_sasrec
    from tiny import tiny_sasrec

    out = tmp_path_factory.mktemp("sas") / "sasrec"
    save_sasrec(tiny_sasrec(ds.n_items), out)
    return out
