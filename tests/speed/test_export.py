import pytest
import torch

from sparselearn import cli
from sparselearn.experiments.export import load_run_model
from sparselearn.speed import export, sparse_state_dict

pytest.importorskip("sklearn")  # the digits data set ships with scikit-learn


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    code = cli.main(["train", "--epochs", "1", "--density", "0.05", "--out", str(out / "r")])
    assert code == 0
    (ckpt,) = out.rglob("checkpoint.pt")
    return ckpt.parent


@pytest.mark.parametrize("fmt", ["compact", "sparse", "onnx"])
def test_export_run_formats_are_smaller_and_equal(run_dir, tmp_path, capsys, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    target = tmp_path / f"m.{fmt}"
    assert cli.main(["export", str(run_dir), "--format", fmt, "--out", str(target)]) == 0
    line = capsys.readouterr().out
    assert "of the dense state dict" in line
    model, masks, x = load_run_model(run_dir)
    dense_bytes = sum(p.numel() * 4 for p in model.state_dict().values())
    # 5% density: the sparse formats are far smaller; compaction removes only the empty units
    assert target.stat().st_size < (0.9 if fmt != "sparse" else 0.3) * dense_bytes
    x = torch.randn(7, *x.shape[1:])
    with torch.no_grad():
        ref = model(x)
        if fmt == "compact":
            small = torch.export.load(str(target)).module()
            torch.testing.assert_close(small(x), ref, atol=1e-5, rtol=1e-4)
        elif fmt == "sparse":
            state = torch.load(target, weights_only=True)
            assert any(v.layout != torch.strided for v in state.values())
            dense = {k: (v.to_dense() if v.layout != torch.strided else v) for k, v in state.items()}
            model.load_state_dict(dense)
            torch.testing.assert_close(model(x), ref)
        else:
            import onnxruntime as ort

            got = ort.InferenceSession(str(target)).run(None, {"input": x.numpy()})[0]
            assert abs(got - ref.numpy()).max() < 1e-4


def test_export_of_a_folder_of_runs_writes_each_runs_file(run_dir, tmp_path, capsys):
    import shutil

    root = tmp_path / "seeds"
    for name in ("seed0", "seed1"):
        shutil.copytree(run_dir, root / name)
    (root / "notes").mkdir()  # a folder below that is no run is passed over
    assert cli.main(["export", str(root), "--format", "sparse"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [f"wrote {root / n / 'model.sparse.pt'}" for n in ("seed0", "seed1")]
    for name in ("seed0", "seed1"):
        state = torch.load(root / name / "model.sparse.pt", weights_only=True)
        assert any(v.layout != torch.strided for v in state.values())
    # one --out for several runs would overwrite itself: refused in one line, nothing written
    assert cli.main(["export", str(root), "--format", "compact", "--out", str(tmp_path / "m.pt2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out names one file" in err and "2 runs" in err
    assert not (tmp_path / "m.pt2").exists()
    # a folder with no run below it: one line naming it
    assert cli.main(["export", str(root / "notes")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no run folder" in err and "notes" in err


def test_export_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        export(torch.nn.Linear(2, 2), "zip", tmp_path / "x", example_input=torch.zeros(1, 2))


def test_sparse_state_dict_keeps_only_active_entries():
    lin = torch.nn.Linear(6, 4)
    mask = torch.rand(4, 6) < 0.3
    with torch.no_grad():
        lin.weight.mul_(mask)
    sd = sparse_state_dict(lin, {"weight": mask})
    assert sd["weight"].layout == torch.sparse_csr and sd["weight"].values().numel() <= int(mask.sum())
    torch.testing.assert_close(sd["weight"].to_dense(), lin.weight.detach())


def test_bench_quick_writes_a_report(tmp_path):
    # every group at tiny shapes (~20 s): a group broken by an API change fails here, not in the long run
    out = tmp_path / "perf.md"
    assert cli.main(["bench", "--quick", "--rounds", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Machine:" in text and "Sparse linear 64x64" in text
    for title in ("Engine overhead", "Kernel-sparse 3x3 convolution", "Whole model: Starfire CK and window masks",
                  "sparse convolution, measured and estimated", "compaction of its empty channels",
                  "Peak memory"):
        assert title in text, title
    assert (tmp_path / "perf.json").exists()
    # the committed document's assembly (benchmarks/assemble_report.py) of two such reports and the notes
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("assemble_report", root / "benchmarks" / "assemble_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    notes = [p.read_text() for p in sorted((root / "docs" / "performance-notes").glob("*.md"))]
    doc = mod.assemble(text, text, notes)
    if "| case | measured" in text:
        assert "| case | run A | run B | target | A / B |" in doc and "| case | measured" not in doc
    for title, note in (("Engine overhead", "engine"), ("Kernel-sparse 3x3 convolution", "convolution")):
        sec = doc[doc.index(f"### {title}"):]  # each note right after its own table
        assert f"**Reading the {note} table" in sec[:sec.index("\n### ")]
    assert "### End to end: a Starfire run" in doc and doc.index("This whole document") < doc.index("## Measurements")


def test_bench_report_says_whether_other_work_shared_the_machine():
    from sparselearn.experiments.bench_util import _load_note

    threads = torch.get_num_threads()
    assert _load_note(0.1, threads + 0.2).startswith("no other process ran alongside")
    assert _load_note(1.7, threads + 0.2).startswith("no other process ran alongside")  # busy only before it
    assert _load_note(0.1, threads + 1.5).startswith("other processes shared the cores")  # busy during it
