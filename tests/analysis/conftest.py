"""Real runs for the plot and report tests: the small CNN on the bundled digits, 2 epochs each
(under a second per run), laid out as a `sparselearn compare` sweep folder."""
import pytest

from sparselearn.experiments import compare as K
from sparselearn.experiments import config as C
from sparselearn.experiments import train as T


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sweep")
    runs = K.plan(["dense", "sparse-momentum"], [0.1], [0, 1])
    for run in runs:
        cfg = C.resolve_config(None, [("model.name", "small-cnn"), ("train.epochs", 2), ("train.seed", run.seed),
                                      ("sparsity.algorithm", run.algorithm), ("sparsity.density", run.density)])
        T.train(cfg, run.folder(out), log=lambda line: None)
    K.write_tables(K.table_rows(K.collect(runs, out)), out, "digits")
    torch.set_num_threads(threads)
    return out
