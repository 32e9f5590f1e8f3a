"""Issue 15, daal-eval: --save-embeddings (embeddings, labels, paths, for retrieval outside the
package), existing eval.json / tsne_eval.png / embedding files are never replaced unasked; and
every user error of daal-train / daal-eval is one ``error:`` line with exit status 2."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from daal_triton.train import cli  # noqa: E402

TINY = ["--dataset", "shapes", "--image-size", "32", "--shapes-train-per-class", "4",
        "--shapes-test-per-class", "4", "-P", "3", "-K", "2", "--steps-per-epoch", "1", "--embedding-dim", "8",
        "--eval-batch-size", "64", "--no-progress", "--no-tsne", "--no-baselines", "--epochs", "1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("evalcli") / "run")
    assert cli.main(TINY + ["--out", out]) == 0
    return out


def _ck(run_dir):
    return os.path.join(run_dir, "checkpoint_last.pt")


def test_save_embeddings_torch_file(run_dir, tmp_path):
    ev, path = str(tmp_path / "ev"), str(tmp_path / "emb.pt")
    assert cli.eval_main([_ck(run_dir), "--out", ev, "--no-progress", "--no-tsne", "--save-embeddings", path]) == 0
    d = torch.load(path, weights_only=True)
    n = 12 * 4  # 12 held-out classes x 4 images
    assert d["embeddings"].shape == (n, 8) and d["embeddings"].dtype == torch.float32
    assert d["labels"].shape == (n,) and d["labels"].dtype == torch.int64
    assert len(d["paths"]) == n and d["paths"][3] == "shapes:test:3"
    assert len(d["class_names"]) == 12 and d["dataset"] == "shapes" and d["epoch"] == 1
    # the saved embeddings give the numbers eval.json reports
    from daal_triton.train.evaluate import retrieval_metrics

    res = json.load(open(os.path.join(ev, "eval.json")))
    (row,) = res["results"].values()
    assert retrieval_metrics(d["embeddings"], d["labels"])["recall@1"] == pytest.approx(row["recall@1"])


def test_eval_json_records_the_data_it_evaluated(run_dir, tmp_path):
    """eval.json says what was evaluated, so its numbers can be made again: the data set and its
    folder, the generated set's seed and sizes, the image size and the metrics' seed; a flag that
    changes one is recorded as given. It is strict JSON: a metric undefined on this data (the
    sub-cluster NMI of 4 images a class) is null, as in metrics.jsonl, not NaN (a docs audit,
    2026-12-07)."""
    ev = tmp_path / "ev"
    assert cli.eval_main([_ck(run_dir), "--out", str(ev), "--no-progress", "--no-tsne", "--data-seed", "3"]) == 0

    def no_constants(name):
        raise ValueError(f"{name} in eval.json")

    res = json.loads((ev / "eval.json").read_text(), parse_constant=no_constants)
    (row,) = res["results"].values()
    assert row["subcluster_nmi"] is None and 0 <= row["recall@1"] <= 1
    want = dict(dataset="shapes", data_root=None, image_size=32, data_seed=3, seed=0, test_images=48,
                test_classes=12, shapes_train_per_class=4, shapes_test_per_class=4, shapes_nuisance=1.0)
    assert {k: res.get(k) for k in want} == want, res
    assert os.listdir(ev) == ["eval.json"]  # written atomically: no .tmp left


def test_save_embeddings_into_a_new_folder(run_dir, tmp_path):
    """A --save-embeddings path whose folder does not exist yet is created, as --out is (it was a
    FileNotFoundError traceback after the whole evaluation)."""
    path = tmp_path / "new" / "deeper" / "emb.npz"
    assert cli.eval_main([_ck(run_dir), "--out", str(tmp_path / "ev"), "--no-progress", "--no-tsne",
                          "--save-embeddings", str(path)]) == 0
    with np.load(path) as z:
        assert z["embeddings"].shape == (48, 8)
    assert os.listdir(path.parent) == ["emb.npz"]  # no .tmp left


def test_a_failed_write_is_one_line_and_leaves_no_tmp(run_dir, tmp_path, full_disk, error_line):
    """A disk that fills while the embeddings are written: one error line naming the file, exit
    status 1, and no half-written ``.tmp`` beside it."""
    path = tmp_path / "emb.pt"
    assert cli.eval_main([_ck(run_dir), "--out", str(tmp_path / "ev"), "--no-progress", "--no-tsne",
                          "--save-embeddings", str(path)]) == 1
    line = error_line("daal-eval")
    assert f"{path}" in line and "cannot write it" in line and "disk full" in line
    assert not os.path.exists(path) and not os.path.exists(f"{path}.tmp")


def test_save_embeddings_npz(run_dir, tmp_path):
    path = str(tmp_path / "emb.npz")
    assert cli.eval_main([_ck(run_dir), "--out", str(tmp_path / "ev"), "--no-progress", "--no-tsne",
                          "--save-embeddings", path]) == 0
    with np.load(path) as z:  # no pickled objects: allow_pickle stays False
        assert z["embeddings"].shape == (48, 8) and z["labels"].shape == (48,)
        assert z["paths"][0] == "shapes:test:0" and len(z["class_names"]) == 12


def test_eval_never_replaces_files_unasked(run_dir, tmp_path, error_line):
    ev = tmp_path / "ev"
    ev.mkdir()
    for name in ("eval.json", "tsne_eval.png"):
        (ev / name).write_text("mine")
    emb = tmp_path / "emb.pt"
    emb.write_text("mine too")
    argv = [_ck(run_dir), "--out", str(ev), "--no-progress", "--tsne-max-points", "48"]
    assert cli.eval_main(argv) == 2
    line = error_line("daal-eval")
    assert "eval.json" in line and "tsne_eval.png" in line and "--overwrite" in line
    assert cli.eval_main([_ck(run_dir), "--out", str(tmp_path / "ev2"), "--no-tsne", "--no-progress",
                          "--save-embeddings", str(emb)]) == 2
    assert "emb.pt" in error_line("daal-eval")
    assert (ev / "eval.json").read_text() == "mine" and (ev / "tsne_eval.png").read_text() == "mine"
    assert emb.read_text() == "mine too" and not (tmp_path / "ev2").exists()
    # --no-tsne needs only eval.json free; --overwrite replaces
    assert cli.eval_main(argv + ["--overwrite"]) == 0
    assert json.load(open(ev / "eval.json"))["dataset"] == "shapes"
    assert (ev / "tsne_eval.png").read_bytes()[:4] == b"\x89PNG"
    # --overwrite --no-tsne: no plot of an earlier evaluation stays beside the new eval.json
    assert cli.eval_main(argv + ["--overwrite", "--no-tsne"]) == 0
    assert sorted(os.listdir(ev)) == ["eval.json"]


def test_default_out_next_to_the_checkpoint_is_not_replaced(run_dir, error_line):
    assert cli.eval_main([_ck(run_dir), "--no-progress", "--no-tsne"]) == 0
    first = open(os.path.join(run_dir, "eval.json")).read()
    assert cli.eval_main([_ck(run_dir), "--no-progress", "--no-tsne"]) == 2
    assert "eval.json" in error_line("daal-eval")
    assert open(os.path.join(run_dir, "eval.json")).read() == first
    os.remove(os.path.join(run_dir, "eval.json"))


# ----------------------------------------------------------------------------- one error line

TRAIN_USAGE = {
    "bad-int": ["--epochs", "abc"],
    "bad-choice": ["--dataset", "mnist"],
    "unknown-flag": ["--no-such-flag", "3"],
    "missing-value": ["--lr"],
    "bad-float": ["--lr", "fast"],
}


@pytest.mark.parametrize("case", sorted(TRAIN_USAGE))
def test_daal_train_command_line_errors_are_one_line(case, tmp_path, error_line):
    out = tmp_path / "out"
    assert cli.main(TINY + TRAIN_USAGE[case] + ["--out", str(out)]) == 2
    assert "--help" in error_line("daal-train")
    assert not out.exists()


def test_daal_train_out_errors_are_one_line(tmp_path, error_line):
    f = tmp_path / "a-file"
    f.write_text("mine")
    for out in (f / "sub", f):
        assert cli.main(TINY + ["--out", str(out)]) == 2
        assert "--out" in error_line("daal-train")
    assert f.read_text() == "mine"
    assert cli.main(TINY + ["--stop-after", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--stop-after" in error_line("daal-train")


@pytest.mark.parametrize("argv, words", [
    (["--no-such-flag"], "--no-such-flag"),
    (["--knn-backend", "fast"], "--knn-backend"),
    ([], "checkpoint"),
])
def test_daal_eval_command_line_errors_are_one_line(run_dir, tmp_path, argv, words, error_line):
    ev = tmp_path / "ev"
    full = argv if not argv else [_ck(run_dir)] + argv
    assert cli.eval_main(full + ["--out", str(ev)]) == 2
    assert words in error_line("daal-eval")
    assert not ev.exists()


def test_daal_eval_out_is_a_file(run_dir, tmp_path, error_line):
    f = tmp_path / "a-file"
    f.write_text("mine")
    assert cli.eval_main([_ck(run_dir), "--out", str(f), "--no-tsne"]) == 2
    assert "--out" in error_line("daal-eval")
    assert cli.eval_main([_ck(run_dir), "--out", str(tmp_path / "ev"), "--no-tsne",
                          "--save-embeddings", str(tmp_path)]) == 2
    assert "--save-embeddings" in error_line("daal-eval")
    assert cli.eval_main([_ck(run_dir), "--out", str(tmp_path / "ev"), "--no-tsne",
                          "--save-embeddings", str(f / "e.pt")]) == 2
    line = error_line("daal-eval")
    assert line.startswith(f"daal-eval: error: --save-embeddings {f / 'e.pt'}: ") and "--out" not in line
    assert f.read_text() == "mine" and not (tmp_path / "ev").exists()


@pytest.mark.parametrize("target", ["eval.json", "tsne_eval.png", "the-out-folder", "the-checkpoint", "a-long-name",
                                    "long-with-its-tmp", "the-runs-metrics", "the-runs-config-via-out",
                                    "the-runs-metrics-via-a-link"])
def test_save_embeddings_onto_what_daal_eval_reads_or_writes_is_refused(run_dir, tmp_path, target, error_line):
    """``--save-embeddings`` at daal-eval's own eval.json or t-SNE (also by another spelling of the
    path), at the --out folder, or at the checkpoint it evaluates (even with --overwrite): one of
    the two files was lost in silence (exit 0), the checkpoint replaced by embeddings; a name too
    long failed after the whole evaluation (a probe, 2026-12-06). Refused up front, naming the flag.
    So are the run's own records, in its folder or in --out: --overwrite replaced metrics.jsonl or
    config.json with embeddings (2026-12-07)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ck = run / "checkpoint_last.pt"
    before = ck.read_bytes()
    ev = tmp_path / "ev"
    save = {"eval.json": f"{tmp_path}/ev/../ev/eval.json", "tsne_eval.png": str(ev / "tsne_eval.png"),
            "the-out-folder": str(ev), "the-checkpoint": str(ck), "a-long-name": str(tmp_path / ("e" * 300)),
            # 253 bytes fit, not its NAME.tmp: it failed after the evaluation (a file-safety probe, 2026-12-07)
            "long-with-its-tmp": str(tmp_path / ("e" * 250 + ".pt")), "the-runs-metrics": str(run / "metrics.jsonl"),
            "the-runs-config-via-out": str(run / "config.json"),
            "the-runs-metrics-via-a-link": str(run / "metrics.jsonl")}[target]
    if target == "the-runs-config-via-out":
        ev = run  # daal-eval writes into the run's folder, as it does by default
    if target == "the-runs-metrics-via-a-link":  # the checkpoint named through a link elsewhere (a review, 2026-12-07)
        (tmp_path / "links").mkdir()
        (tmp_path / "links" / "last.pt").symlink_to(ck)
        ck = tmp_path / "links" / "last.pt"
    records = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "config.json")}
    argv = [str(ck), "--out", str(ev), "--no-progress", "--tsne-max-points", "48", "--save-embeddings", save]
    assert cli.eval_main(argv + ["--overwrite"] * (target.startswith("the-"))) == 2
    line = error_line("daal-eval")
    assert line.startswith(f"daal-eval: error: --save-embeddings {save}: ")
    assert ("the run folder's" in line) == target.startswith("the-runs")
    assert ck.read_bytes() == before and (ev == run or not ev.exists())
    assert {name: (run / name).read_bytes() for name in records} == records


def test_a_checkpoint_whose_configuration_is_out_of_range_is_one_line(run_dir, tmp_path, error_line):
    """A checkpoint's own configuration, digest and all, with a width the network cannot have: a
    traceback from its constructor before; now the error daal-train gives for --width."""
    from daal_triton.train import checkpoint as C

    ck = C.load_checkpoint(_ck(run_dir))
    ck["config"]["width"] = -1.0  # load_checkpoint took the digest out
    ck["sha256"] = C.digest(ck)
    path = str(tmp_path / "edited.pt")
    torch.save(ck, path)
    assert cli.eval_main([path, "--out", str(tmp_path / "ev"), "--no-progress", "--no-tsne"]) == 2
    line = error_line("daal-eval")
    assert "--width must be a number in (0, 4], got -1.0" in line and path in line


def test_daal_eval_draws_the_test_images_only(run_dir, tmp_path, monkeypatch):
    """daal-eval evaluates the held-out classes; it drew the shapes training split too, which it
    never reads (at 224 px, about 27 ms an image: the default 1,440 took some 39 s). The same test
    images as before: the embeddings equal those of a dataset built with both splits."""
    from daal_triton.train.data import build_datasets, shapes

    real, drawn = shapes.render, []
    monkeypatch.setattr(shapes, "render", lambda *a, **k: drawn.append(1) or real(*a, **k))
    path = str(tmp_path / "emb.pt")
    assert cli.eval_main([_ck(run_dir), "--out", str(tmp_path / "ev"), "--no-progress", "--no-tsne",
                          "--save-embeddings", path]) == 0
    assert len(drawn) == 12 * 4  # the 12 held-out classes x --shapes-test-per-class 4, no training image
    monkeypatch.setattr(shapes, "render", real)
    _, both = build_datasets("shapes", None, 32, shapes_train_per_class=4, shapes_test_per_class=4)
    train, alone = build_datasets("shapes", None, 32, shapes_train_per_class=4, shapes_test_per_class=4, train=False)
    assert len(train) == 0 and len(alone) == len(both) == 48
    assert all(torch.equal(alone[i][0], both[i][0]) and alone[i][1] == both[i][1] for i in range(48))


def test_a_users_file_at_the_save_embeddings_tmp_name_is_kept(run_dir, tmp_path, error_line):
    """daal-eval writes --save-embeddings X to X.tmp, then renames it: a file of the user's named
    X.tmp was written over and then renamed away (lost), even without --overwrite. Refused up front;
    a link there is only a link (write_atomically replaces it, what it points to stays)."""
    emb = tmp_path / "emb.pt"
    mine = tmp_path / "emb.pt.tmp"
    mine.write_text("my notes")
    argv = [_ck(run_dir), "--out", str(tmp_path / "ev"), "--no-tsne", "--no-progress", "--save-embeddings", str(emb)]
    assert cli.eval_main(argv) == 2
    assert f"{mine} is there, and daal-eval writes the embeddings to emb.pt.tmp first" in error_line("daal-eval")
    assert mine.read_text() == "my notes" and not emb.exists() and not (tmp_path / "ev").exists()
    os.remove(mine)
    os.symlink(tmp_path / "elsewhere.txt", mine)  # dangling
    assert cli.eval_main(argv) == 0
    assert torch.load(emb, weights_only=True)["embeddings"].ndim == 2
    assert not os.path.lexists(mine) and not (tmp_path / "elsewhere.txt").exists()


def test_nmi_off_is_null_and_said(run_dir, tmp_path, capsys):
    """``--nmi off`` (daal-eval, as daal-train): NMI is null in eval.json, the other metrics are
    there, and the log says why; "auto" on this small set computes it."""
    ev = tmp_path / "ev"
    assert cli.eval_main([_ck(run_dir), "--out", str(ev), "--no-progress", "--no-tsne", "--nmi", "off"]) == 0
    (row,) = json.load(open(ev / "eval.json"))["results"].values()
    assert row["nmi"] is None and 0 <= row["recall@1"] <= 1
    assert "the checkpoint: NMI left out (--nmi off)" in capsys.readouterr().out
    assert cli.eval_main([_ck(run_dir), "--out", str(tmp_path / "ev2"), "--no-progress", "--no-tsne"]) == 0
    (row,) = json.load(open(tmp_path / "ev2" / "eval.json"))["results"].values()
    assert 0 <= row["nmi"] <= 1 and "NMI left out" not in capsys.readouterr().out
