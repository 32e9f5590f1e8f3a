"""Issue 15, resume: a resumed run takes its configuration from the checkpoint unless a flag
overrides it explicitly, refuses flags that would change the data, network or loss, records what
changed in config.json (keeping the original), refuses a checkpoint without optimiser state, and
equals the uninterrupted run for every schedule."""
import json
import os
import shutil
from dataclasses import replace as dataclasses_replace

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from daal_triton.train import cli  # noqa: E402

TINY = ["--dataset", "shapes", "--image-size", "32", "--shapes-train-per-class", "4",
        "--shapes-test-per-class", "4", "-P", "3", "-K", "2", "--steps-per-epoch", "2", "--embedding-dim", "8",
        "--eval-batch-size", "64", "--no-progress", "--no-tsne", "--no-baselines"]
TIMINGS = ("train_s", "eval_s", "embed_s", "elapsed_s", "data_wait_s", "train_images_per_s")


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in f]


def _ck(out, name="checkpoint_last.pt"):
    return torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)


def _last(out):
    return os.path.join(out, "checkpoint_last.pt")


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A finished 1-epoch run (warm-up 0: its schedule ends at lr 0)."""
    out = str(tmp_path_factory.mktemp("resume") / "one")
    assert cli.main(TINY + ["--epochs", "1", "--warmup-epochs", "0", "--out", out]) == 0
    return out


def _copy(src, tmp_path, name="copy"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- bit-identical

SCHEDULES = {  # 2 epochs of 2 steps, stopped after the first
    "warmup-0": ["--epochs", "2", "--warmup-epochs", "0"],
    "warmup-fractional": ["--epochs", "2", "--warmup-epochs", "0.5"],
    "warmup-spans-resume": ["--epochs", "2", "--warmup-epochs", "1.5", "--eval-every", "2"],
    "memory-bank": ["--epochs", "2", "--warmup-epochs", "0", "--memory-bank", "24"],
    # a loader worker draws the augmentation: its seed must come from the checkpointed RNG at each
    # epoch (persistent workers kept the first epoch's stream, which a resumed run cannot restore)
    "workers-augment": ["--epochs", "2", "--warmup-epochs", "0", "--num-workers", "1", "--augment", "shift"],
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_stopped_then_resumed_equals_uninterrupted(schedule, tmp_path):
    flags = TINY + SCHEDULES[schedule]
    full, parts = str(tmp_path / "full"), str(tmp_path / "parts")
    assert cli.main(flags + ["--out", full]) == 0
    assert cli.main(flags + ["--out", parts, "--stop-after", "1"]) == 0
    assert _ck(parts)["epoch"] == 1
    assert cli.main(["--resume", _last(parts), "--no-progress"]) == 0  # everything else from the checkpoint
    assert _records(parts) == _records(full)
    resumes = json.load(open(os.path.join(parts, "config.json")))["resumes"]
    assert len(resumes) == 1 and resumes[0]["changed"] == {}  # --stop-after is the launch's, not a change
    a, b = _ck(full), _ck(parts)
    assert a["epoch"] == b["epoch"] == 2
    for part in ("model", "loss"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    if "memory_bank" in a:
        assert torch.equal(a["memory_bank"]["embeddings"], b["memory_bank"]["embeddings"])


def _same_run(a_out, b_out):
    assert _records(a_out) == _records(b_out)
    a, b = _ck(a_out), _ck(b_out)
    for part in ("model", "loss"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


@pytest.mark.parametrize("augment", ["shift", "crop"])
def test_the_number_of_loader_workers_does_not_change_the_result(augment, tmp_path):
    """Each image is augmented from a seed of its own (drawn with the batch), not from whichever
    worker process loads it: 0, 1 and 2 workers train bit-identical weights. (The default number
    of workers on CUDA follows the machine's cores.)"""
    flags = TINY + ["--epochs", "1", "--warmup-epochs", "0", "--augment", augment, "--no-tsne"]
    outs = [str(tmp_path / f"w{n}") for n in (0, 1, 2)]
    for n, out in zip((0, 1, 2), outs):
        assert cli.main(flags + ["--num-workers", str(n), "--out", out]) == 0
    for out in outs[1:]:
        _same_run(outs[0], out)


def test_augmentations_vary_with_the_seed_and_the_epoch():
    """The seeded draws: the same (seed, epoch) gives the same images, augmented the same; the
    indices are those the unseeded sampler draws; every draw has its own seed, new in each epoch
    and for each --seed, and two seeds crop one image differently; reading leaves torch's
    generator as it was."""
    from daal_triton.train.data import PKSampler, SeededDraws, build_datasets

    train, _ = build_datasets("shapes", None, 32, seed=0, augment="crop", shapes_train_per_class=4,
                              shapes_test_per_class=2)
    ds = SeededDraws(train)

    def draws(seed, epoch):
        s = PKSampler(train.labels, 3, 2, seed=seed, seeded=True, batches_per_epoch=2)
        s.set_epoch(epoch)
        out = [item for b in s for item in b]
        assert all(isinstance(i, int) and isinstance(z, int) for i, z in out)
        return out

    first = draws(0, 0)
    plain = PKSampler(train.labels, 3, 2, seed=0, batches_per_epoch=2)
    assert [i for b in plain for i in b] == [i for i, _ in first]
    seeds = {z for _, z in first}
    assert len(seeds) == len(first)
    assert not seeds & {z for _, z in draws(0, 1)} and not seeds & {z for _, z in draws(1, 0)}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    reseeded = []
    real = torch.cuda.manual_seed_all
    torch.cuda.manual_seed_all = reseeded.append  # the GPU's generators are not the data's to touch
    try:
        a = torch.stack([ds[item][0] for item in first])
    finally:
        torch.cuda.manual_seed_all = real
    assert torch.equal(torch.get_rng_state(), before) and reseeded == []
    assert torch.equal(torch.stack([ds[item][0] for item in draws(0, 0)]), a)
    (i, z1), (_, z2) = first[0], first[1]
    assert not torch.equal(ds[(i, z1)][0], ds[(i, z2)][0])  # one image, two seeds: two crops
    assert ds[(i, z1)][1] == train[i][1]


def test_extending_a_finished_run_does_not_restart_at_lr_zero(one_epoch, tmp_path, monkeypatch):
    """--epochs 1 with warm-up 0 ends its cosine at lr 0; resumed to --epochs 2, the first step
    runs at the 2-epoch schedule's rate for its step (0.5 x lr), not at 0."""
    from daal_triton.train import engine

    out = _copy(one_epoch, tmp_path)
    seen = []
    real = engine.train_one_epoch

    def spy(model, criterion, loader, optimizer, *a, **k):
        seen.append([g["lr"] for g in optimizer.param_groups])
        return real(model, criterion, loader, optimizer, *a, **k)

    monkeypatch.setattr("daal_triton.train.run.train_one_epoch", spy)
    assert cli.main(["--resume", _last(out), "--epochs", "2", "--no-progress"]) == 0
    lr, loss_lr = 1e-3, 5e-3
    assert seen[0][0] == pytest.approx(0.5 * lr) and seen[0][-1] == pytest.approx(0.5 * loss_lr)


def test_resume_says_an_earlier_evaluation_is_of_an_older_checkpoint(one_epoch, tmp_path, capsys):
    """daal-eval writes eval.json beside the checkpoint it evaluates (with its epoch); a resumed
    run in that folder keeps the file byte for byte and says it describes epoch 1."""
    out = _copy(one_epoch, tmp_path)
    assert cli.eval_main([_last(out), "--no-progress", "--no-tsne"]) == 0
    path = os.path.join(out, "eval.json")
    before = open(path, "rb").read()
    assert json.loads(before)["epoch"] == 1
    capsys.readouterr()
    assert cli.main(["--resume", _last(out), "--epochs", "2", "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert f"kept as it was: daal-eval's eval.json in {out}, of epoch 1" in log, log
    assert open(path, "rb").read() == before and _ck(out)["epoch"] == 2
    shutil.copytree(out, str(tmp_path / "again"))  # no eval.json, no note
    os.remove(os.path.join(str(tmp_path / "again"), "eval.json"))
    capsys.readouterr()
    assert cli.main(["--resume", _last(str(tmp_path / "again")), "--epochs", "3", "--no-progress"]) == 0
    assert "daal-eval's" not in capsys.readouterr().out


def test_a_resume_with_no_tsne_says_the_picture_is_older(one_epoch, tmp_path, capsys):
    """The one-epoch run (made with --no-tsne) given a t-SNE picture, then resumed to epoch 2 with
    --no-tsne: the picture is kept as it was, and the log says it is from before the last epoch."""
    out = _copy(one_epoch, tmp_path)
    with open(os.path.join(out, "tsne_test.png"), "wb") as f:
        f.write(b"\x89PNG earlier")
    capsys.readouterr()
    assert cli.main(["--resume", _last(out), "--epochs", "2", "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert f"kept as it was: {os.path.join(out, 'tsne_test.png')}, drawn before this run's last epoch (2)" in log, log
    assert open(os.path.join(out, "tsne_test.png"), "rb").read() == b"\x89PNG earlier"


# ----------------------------------------------------------------------------- configuration

def test_resume_without_flags_keeps_the_data_set(one_epoch, tmp_path, capsys):
    """The checkpoint's configuration, not the flags' defaults (1,440 shapes images)."""
    out = _copy(one_epoch, tmp_path)
    capsys.readouterr()
    assert cli.main(["--resume", _last(out), "--epochs", "2", "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert "48 training images" in log and "1440" not in log
    cfg = _ck(out)["config"]
    assert cfg["shapes_train_per_class"] == 4 and cfg["embedding_dim"] == 8 and cfg["epochs"] == 2
    assert [r["epoch"] for r in _records(out)] == [1, 2]


def test_new_lr_on_resume_is_used_and_recorded(one_epoch, tmp_path, monkeypatch):
    from daal_triton.train import engine

    out = _copy(one_epoch, tmp_path)
    seen = []
    real = engine.train_one_epoch

    def spy(model, criterion, loader, optimizer, scheduler, *a, **k):
        r = real(model, criterion, loader, optimizer, scheduler, *a, **k)
        seen.append((list(scheduler.base_lrs), [g["weight_decay"] for g in optimizer.param_groups]))
        return r

    monkeypatch.setattr("daal_triton.train.run.train_one_epoch", spy)
    assert cli.main(["--resume", _last(out), "--epochs", "2", "--lr", "0.0002", "--weight-decay", "0.01",
                     "--no-progress"]) == 0
    base_lrs, decays = seen[0]
    assert base_lrs[:2] == [0.0002, 0.0002] and base_lrs[2] == 5e-3
    assert decays[0] == 0.01 and decays[1:] == [0.0, 0.0]
    ck = _ck(out)
    assert ck["config"]["lr"] == 0.0002
    assert [g["initial_lr"] for g in ck["optimizer"]["param_groups"]][:2] == [0.0002, 0.0002]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["lr"] == 1e-3 and cfg["epochs"] == 1  # the original configuration stays
    (entry,) = cfg["resumes"]
    assert entry["epoch"] == 1 and entry["checkpoint"] == os.path.abspath(_last(out))
    assert entry["changed"]["lr"] == {"from": 1e-3, "to": 0.0002}
    assert entry["changed"]["epochs"] == {"from": 1, "to": 2}
    assert "seed" not in entry["changed"] and "dataset" not in entry["changed"]
    # a second resume appends to the history; the first configuration still stands at the top
    assert cli.main(["--resume", _last(out), "--epochs", "3", "--no-progress"]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["epochs"] == 1 and cfg["lr"] == 1e-3 and len(cfg["resumes"]) == 2
    assert cfg["resumes"][1]["changed"] == {"epochs": {"from": 2, "to": 3}}
    assert [r["epoch"] for r in _records(out)] == [1, 2, 3]


@pytest.mark.parametrize("flags, words", [
    (["--embedding-dim", "16"], "--embedding-dim"),
    (["--shapes-train-per-class", "120"], "--shapes-train-per-class"),
    (["--dataset", "digits"], "--dataset"),
    (["--seed", "1"], "--seed"),
    (["-P", "4"], "--classes-per-batch"),
    (["--arch", "vgg19"], "--arch"),
    (["--daal-alpha", "0.5"], "--daal-alpha"),
    (["--memory-bank", "12"], "--memory-bank"),
    (["--steps-per-epoch", "3"], "--steps-per-epoch"),
    (["--augment", "shift"], "--augment"),
    (["--image-size", "64"], "--image-size"),
])
def test_flags_that_change_data_or_model_are_refused(one_epoch, tmp_path, flags, words, error_line):
    out = _copy(one_epoch, tmp_path)
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    assert cli.main(["--resume", _last(out), "--epochs", "2", "--no-progress"] + flags) == 2
    line = error_line("daal-train")
    assert words in line and "--resume" in line
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_a_flag_equal_to_the_checkpoint_is_not_a_change(one_epoch, tmp_path):
    out = _copy(one_epoch, tmp_path)
    assert cli.main(["--resume", _last(out), "--epochs", "2", "--embedding-dim", "8", "-P", "3",
                     "--no-progress"]) == 0
    (entry,) = json.load(open(os.path.join(out, "config.json")))["resumes"]
    assert set(entry["changed"]) == {"epochs", "out"}  # out: the copy's folder


def test_every_setting_is_fixed_or_may_change_on_resume():
    """Each field of TrainConfig is in exactly one of the lists: one in neither would change on
    resume unrefused, unrecorded as a rule."""
    import dataclasses

    from daal_triton.train import config as C

    names = sorted(f.name for f in dataclasses.fields(C.TrainConfig))
    assert sorted(C.RESUME_FIXED + C.RESUME_MAY_CHANGE + C._NOT_INHERITED) == names


def test_overwrite_and_resume_together_are_refused(one_epoch, tmp_path, error_line):
    # --overwrite would remove the run's checkpoints, metrics and daal-eval's files it resumes
    out = _copy(one_epoch, tmp_path)
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    assert cli.main(["--resume", _last(out), "--epochs", "2", "--overwrite", "--no-progress"]) == 2
    line = error_line("daal-train")
    assert "--overwrite" in line and "--resume" in line and "give one of them" in line
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_stop_after_at_the_checkpoint_epoch_is_refused(one_epoch, tmp_path, error_line):
    # --stop-after 1 on a checkpoint of epoch 1 (of 2 now): nothing would train, yet files be rewritten
    out = _copy(one_epoch, tmp_path)
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    assert cli.main(["--resume", _last(out), "--epochs", "2", "--stop-after", "1", "--no-progress"]) == 2
    assert "--stop-after 1: --resume" in error_line("daal-train")
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_best_checkpoint_is_refused_for_resume(one_epoch, tmp_path, error_line):
    out = _copy(one_epoch, tmp_path)
    before = sorted(os.listdir(out))
    assert cli.main(["--resume", os.path.join(out, "checkpoint_best.pt"), "--epochs", "2", "--no-progress"]) == 2
    line = error_line("daal-train")
    assert "optimizer" in line and "checkpoint_last.pt" in line
    assert sorted(os.listdir(out)) == before


def test_resume_into_a_new_folder_and_not_into_another_run(one_epoch, tmp_path, error_line, capsys, monkeypatch):
    from daal_triton.train import evaluate as E

    real = E.all_metrics
    # epoch 2 does not beat epoch 1 (its held-out Recall@1 set to 0; the trained value was left to
    # the arithmetic, a tie in one environment and a win after a dependency update)
    monkeypatch.setattr(E, "all_metrics", lambda *a, **k: dict(real(*a, **k), **{"recall@1": 0.0}))
    other = str(tmp_path / "other")
    os.makedirs(other)
    with open(os.path.join(other, "mine.txt"), "w") as f:
        f.write("keep")
    assert cli.main(["--resume", _last(one_epoch), "--epochs", "2", "--out", other, "--no-progress"]) == 2
    assert "not empty" in error_line("daal-train")
    assert os.listdir(other) == ["mine.txt"]
    new = str(tmp_path / "new")
    assert cli.main(["--resume", _last(one_epoch), "--epochs", "2", "--out", new, "--no-progress"]) == 0
    # the best checkpoint stays in the first folder, and it is said
    assert not os.path.exists(os.path.join(new, "checkpoint_best.pt"))
    assert f"is in {os.path.join(one_epoch, 'checkpoint_best.pt')}" in capsys.readouterr().out
    assert [r["epoch"] for r in _records(new)] == [1, 2]  # the history comes with the checkpoint
    cfg = json.load(open(os.path.join(new, "config.json")))
    assert cfg["epochs"] == 1 and cfg["resumes"][0]["changed"]["out"]["to"] == new
    assert _ck(one_epoch)["epoch"] == 1  # the original run is untouched


def test_an_older_copy_in_the_run_folder_does_not_replace_its_last_state(one_epoch, tmp_path, error_line):
    # a snapshot kept beside checkpoint_last.pt: resuming it there would overwrite the later state
    run = _copy(one_epoch, tmp_path)
    snapshot = os.path.join(run, "snapshot_epoch1.pt")
    shutil.copyfile(_last(run), snapshot)
    before = {f: open(os.path.join(run, f), "rb").read() for f in os.listdir(run) if os.path.isfile(os.path.join(run, f))}
    assert cli.main(["--resume", snapshot, "--epochs", "2", "--no-progress"]) == 2
    line = error_line("daal-train")
    assert "is not" in line and "another --out" in line, line
    after = {f: open(os.path.join(run, f), "rb").read() for f in os.listdir(run) if os.path.isfile(os.path.join(run, f))}
    assert after == before
    branch = str(tmp_path / "branch")
    assert cli.main(["--resume", snapshot, "--epochs", "2", "--out", branch, "--no-progress"]) == 0
    assert _ck(branch)["epoch"] == 2 and _ck(run)["epoch"] == 1


@pytest.mark.parametrize("save", ["best", "none"])
def test_a_resume_in_place_that_would_leave_its_last_state_behind_is_refused(one_epoch, tmp_path, error_line, save):
    """A run resumed in its own folder with --save best|none trained on while checkpoint_last.pt stayed
    at its epoch: a later --resume of that file replaced the epochs trained since, records and all,
    with no word (a run-folder probe, 2026-12-07). Refused up front; into another --out it goes."""
    run = _copy(one_epoch, tmp_path)
    before = {f: open(os.path.join(run, f), "rb").read() for f in os.listdir(run) if os.path.isfile(os.path.join(run, f))}
    assert cli.main(["--resume", _last(run), "--epochs", "2", "--save", save, "--no-progress"]) == 2
    line = error_line("daal-train")
    assert f"--save {save} with --resume in the run's own folder" in line and "another --out" in line, line
    after = {f: open(os.path.join(run, f), "rb").read() for f in os.listdir(run) if os.path.isfile(os.path.join(run, f))}
    assert after == before
    branch = str(tmp_path / "branch")
    assert cli.main(["--resume", _last(run), "--epochs", "2", "--save", save, "--out", branch, "--no-progress"]) == 0
    assert [r["epoch"] for r in _records(branch) if r["model"] == "trained"][-1] == 2


def test_config_file_never_takes_overwrite_and_goes_without_resume(one_epoch, tmp_path, error_line):
    """The config.json of a run made with --overwrite says overwrite: true; rerunning it must not
    replace the run in a non-empty --out unasked. --config and --resume together are refused."""
    target = _copy(one_epoch, tmp_path)
    before = {n: open(os.path.join(target, n), "rb").read() for n in os.listdir(target)}
    saved = json.load(open(os.path.join(one_epoch, "config.json")))
    path = str(tmp_path / "overwritten.json")
    json.dump(dict(saved, overwrite=True), open(path, "w"))
    assert cli.main(["--config", path, "--out", target, "--no-progress"]) == 2
    line = error_line("daal-train")
    assert f"--out {target} is not empty" in line and "--overwrite" in line
    assert cli.main(["--config", path, "--resume", _last(target), "--no-progress"]) == 2
    line = error_line("daal-train")
    assert "--config" in line and "--resume" in line and "give one of them" in line
    assert {n: open(os.path.join(target, n), "rb").read() for n in os.listdir(target)} == before


def test_config_file_reruns_a_run(one_epoch, tmp_path):
    cfg_path = os.path.join(one_epoch, "config.json")
    out = str(tmp_path / "rerun")
    assert cli.main(["--config", cfg_path, "--out", out, "--no-progress"]) == 0
    assert _records(out) == _records(one_epoch)
    again = str(tmp_path / "again")
    assert cli.main(["--config", cfg_path, "--out", again, "--epochs", "2", "--no-progress"]) == 0
    cfg = json.load(open(os.path.join(again, "config.json")))
    assert cfg["epochs"] == 2 and cfg["embedding_dim"] == 8 and cfg["warmup_epochs"] == 0


def test_config_file_takes_daal_flags_on_top(tmp_path):
    """``--config FILE --daal-<name> V``: V replaces that one hyperparameter of the file, even when V
    is the default; the file's other hyperparameters stay."""
    from daal_triton.train.config import TrainConfig, config_file

    default = TrainConfig().daal
    saved = TrainConfig().to_dict()
    saved["daal"] = dict(default, gamma=default["gamma"] * 2 + 1, m0=default["m0"] / 2, k=default["k"] + 2)
    path = str(tmp_path / "config.json")
    json.dump(saved, open(path, "w"))

    def merged(*flags):
        argv = ["--config", path, *flags]
        parser = cli.build_parser()
        args = parser.parse_args(argv)
        return config_file(path, cli.config_from_args(args), cli.given_flags(parser, argv)).daal

    assert merged() == saved["daal"]
    got = merged("--daal-gamma", "0.25", "--daal-k", str(default["k"]))
    assert got == dict(saved["daal"], gamma=0.25, k=default["k"])


@pytest.mark.parametrize("content, words", [
    (None, "no such file"), ("{not json", "JSON"), ('{"epochz": 3}', "epochz"), ("[1, 2]", "JSON object"),
    ('{"epochs": "3"}', "epochs"), ('{"dataset": "mnist"}', "dataset"), ('{"epochs": 0}', "--epochs"),
    # settings whose default is None were not type-checked
    ('{"data_root": 5, "dataset": "folder"}', "data_root must be str"), ('{"miner": 3}', "miner must be str"),
    ('{"channels_last": "yes"}', "channels_last must be bool"), ('{"steps_per_epoch": 1.5}', "steps_per_epoch"),
    ('{"dataset": null}', "dataset must be str"),
    # a value outside a setting's choices is named as the file's, not as a flag never given
    ('{"augment": "bogus"}', "config.json: augment must be one of none, shift, crop, got 'bogus'"),
])
def test_config_file_errors(tmp_path, content, words, error_line):
    path = str(tmp_path / "config.json")
    if content is not None:
        with open(path, "w") as f:
            f.write(content)
    out = tmp_path / "out"
    assert cli.main(["--config", path, "--out", str(out)]) == 2
    assert words in error_line("daal-train")
    assert not out.exists()


def test_data_seed_defaults_and_old_checkpoints():
    """The shapes set is drawn from --data-seed (fixed: 0), not --seed; a configuration saved
    before --data-seed existed drew its data from --seed, and resuming it keeps that data."""
    from daal_triton.train.config import RESUME_FIXED, TrainConfig

    assert TrainConfig(seed=7).data_seed == 0
    assert TrainConfig.from_dict({"seed": 5}).data_seed == 5  # an old run's config.json
    assert TrainConfig.from_dict({"seed": 5, "data_seed": 0}).data_seed == 0
    assert "data_seed" in RESUME_FIXED


@pytest.fixture
def keep_threads():
    """--threads sets torch's thread count for the whole process: put it back afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_threads_goes_with_resume_and_config(one_epoch, tmp_path, keep_threads):
    """--threads is no setting of the run: it was reported as given and broke --resume and --config."""
    out = _copy(one_epoch, tmp_path)
    assert cli.main(["--resume", _last(out), "--epochs", "2", "--threads", "1", "--no-progress"]) == 0
    assert [r["epoch"] for r in _records(out)] == [1, 2]
    (entry,) = json.load(open(os.path.join(out, "config.json")))["resumes"]
    assert "threads" not in entry["changed"]
    again = str(tmp_path / "again")
    assert cli.main(["--config", os.path.join(one_epoch, "config.json"), "--threads", "1", "--out", again,
                     "--no-progress"]) == 0
    assert json.load(open(os.path.join(again, "config.json")))["embedding_dim"] == 8
    assert [r["epoch"] for r in _records(again)] == [1]


# ----------------------------------------------------------------------------- the run's end

def test_epochs_below_the_checkpoint_and_stop_after_passed_are_refused(tmp_path, error_line):
    out = str(tmp_path / "two")
    assert cli.main(TINY + ["--epochs", "3", "--stop-after", "2", "--out", out]) == 0
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    assert cli.main(["--resume", _last(out), "--epochs", "1", "--no-progress"]) == 2
    assert "--epochs 1 is below" in error_line("daal-train")
    assert cli.main(["--resume", _last(out), "--stop-after", "1", "--no-progress"]) == 2
    assert "--stop-after 1" in error_line("daal-train")
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_resuming_a_finished_run_changes_nothing(one_epoch, tmp_path, capsys):
    out = _copy(one_epoch, tmp_path)
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    capsys.readouterr()
    assert cli.main(["--resume", _last(out), "--no-progress"]) == 0
    assert "is finished" in capsys.readouterr().out
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_a_run_stopped_after_its_last_checkpoint_finishes_without_a_second_record(one_epoch, tmp_path, capsys):
    """Killed after the last epoch's checkpoint, before results.txt: --resume writes the table and
    plots, and metrics.jsonl keeps one record of the last epoch; its log says nothing is left to
    train (not "at epoch 2" of a 1-epoch run)."""
    out = _copy(one_epoch, tmp_path)
    os.remove(os.path.join(out, "results.txt"))
    assert cli.main(["--resume", _last(out), "--no-progress"]) == 0
    said = capsys.readouterr()
    assert f"resumed from {_last(out)} after its last epoch, 1 (nothing left to train)" in said.out + said.err
    assert [r["epoch"] for r in _records(out)] == [1]
    assert "trained (daal, epoch 1)" in open(os.path.join(out, "results.txt")).read()


def _interrupt(*_, **__):
    raise KeyboardInterrupt


def test_a_run_stopped_while_plotting_is_completed_by_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the plots are drawn (after the table is printed): results.txt is not there, so
    the advice printed (--resume) draws the plots and writes it."""
    from daal_triton.train import plots

    out = str(tmp_path / "o")
    with monkeypatch.context() as m:
        m.setattr(plots, "training_curves", _interrupt)
        assert cli.main(TINY + ["--epochs", "1", "--out", out]) == 130
    said = capsys.readouterr()
    assert "trained (daal, epoch 1)" in said.out  # printed before the plots
    assert f"while writing the outputs: continue from its last checkpoint with daal-train --resume {_last(out)}" \
        in said.out + said.err
    assert not os.path.exists(os.path.join(out, "results.txt"))
    assert cli.main(["--resume", _last(out), "--no-progress"]) == 0
    assert "is finished" not in capsys.readouterr().out
    assert os.path.isfile(os.path.join(out, "training_curves.png"))
    assert "trained (daal, epoch 1)" in open(os.path.join(out, "results.txt")).read()
    assert [r["epoch"] for r in _records(out)] == [1]


def test_an_extended_run_stopped_before_its_table_is_completed_by_resume(one_epoch, tmp_path, monkeypatch, capsys):
    """--resume --epochs 2 of a finished 1-epoch run, stopped after epoch 2's checkpoint: the folder
    still holds epoch 1's results.txt, which must not make the run read as finished."""
    from daal_triton.train import run as R

    out = _copy(one_epoch, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(R, "finish", _interrupt)
        assert cli.main(["--resume", _last(out), "--epochs", "2", "--no-progress"]) == 130
    assert _ck(out)["epoch"] == 2 and R.results_epoch(os.path.join(out, "results.txt")) == 1
    capsys.readouterr()
    assert cli.main(["--resume", _last(out), "--no-progress"]) == 0
    assert "is finished" not in capsys.readouterr().out
    assert R.results_epoch(os.path.join(out, "results.txt")) == 2
    assert [r["epoch"] for r in _records(out)] == [1, 2]
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    assert cli.main(["--resume", _last(out), "--no-progress"]) == 0  # now it is finished
    assert "is finished" in capsys.readouterr().out
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_a_run_stopped_between_its_checkpoints_keeps_the_best_one(tmp_path, monkeypatch):
    """Stopped right after an epoch's first checkpoint is written: after --resume, checkpoint_best.pt
    is the epoch with the best Recall@1 in metrics.jsonl (not an earlier one, which it was when
    checkpoint_last.pt came first: the history then held a best that no checkpoint had)."""
    from daal_triton.train import evaluate as E
    from daal_triton.train import run as R

    calls = []
    real_metrics, real_save = E.all_metrics, R._save

    def rising(*a, **k):  # every evaluation better than the one before
        m = real_metrics(*a, **k)
        calls.append(1)
        return {**m, "recall@1": len(calls) / 10}

    def stop_in_epoch_2(state, name, **k):
        real_save(state, name, **k)
        if state.epoch == 2 and not stop_in_epoch_2.done:
            stop_in_epoch_2.done = True
            raise KeyboardInterrupt

    stop_in_epoch_2.done = False
    monkeypatch.setattr(E, "all_metrics", rising)
    out = str(tmp_path / "o")
    with monkeypatch.context() as m:
        m.setattr(R, "_save", stop_in_epoch_2)
        assert cli.main(TINY + ["--epochs", "2", "--eval-every", "1", "--out", out]) == 130
    assert cli.main(["--resume", _last(out), "--no-progress"]) == 0
    trained = [r for r in _records(out) if r["model"] == "trained" and r.get("recall@1") is not None]
    best = max(trained, key=lambda r: r["recall@1"])
    assert best["epoch"] == 2 and _ck(out, "checkpoint_best.pt")["epoch"] == 2, (trained, _ck(out, "checkpoint_best.pt")["epoch"])


def test_resume_uses_this_devices_optimizer_implementation(one_epoch, tmp_path):
    # a checkpoint saved by fused AdamW (a CUDA run) resumed on the CPU: the CPU's default AdamW,
    # as a fresh CPU run has, not the saved flag (load_state_dict keeps the saved groups' flags)
    os.makedirs(tmp_path / "gpu")
    src = _ck(one_epoch)
    groups = [dict(g, fused=True, foreach=None) for g in src["optimizer"]["param_groups"]]
    forged = _forge(_last(one_epoch), str(tmp_path / "gpu" / "checkpoint_last.pt"),
                    optimizer=dict(src["optimizer"], param_groups=groups))
    out = str(tmp_path / "cpu")
    assert cli.main(["--resume", forged, "--epochs", "2", "--out", out, "--no-progress"]) == 0
    assert [g["fused"] for g in _ck(out)["optimizer"]["param_groups"]] == [None] * len(groups)


# ----------------------------------------------------------------------------- checkpoints that do not fit

def _forge(src, dst, **changes):
    """A copy of checkpoint ``src`` with ``changes`` (None: the entry removed), its digest redone,
    as a hand-made file would be."""
    from daal_triton.train.checkpoint import digest

    ck = torch.load(src, map_location="cpu", weights_only=True)
    ck.pop("sha256")
    for k, v in changes.items():
        if v is None:
            ck.pop(k)
        else:
            ck[k] = v
    ck["sha256"] = digest(ck)
    torch.save(ck, dst)
    return dst


def test_checkpoints_whose_config_does_not_fit_are_one_error_line(one_epoch, tmp_path, error_line):
    src = _last(one_epoch)
    cfg = _ck(one_epoch)["config"]
    os.makedirs(tmp_path / "wrong")
    wrong = _forge(src, str(tmp_path / "wrong" / "checkpoint_last.pt"), config=dict(cfg, embedding_dim=16))
    bare = str(tmp_path / "bare.pt")
    _forge(src, bare, config=None)
    for path, words in ((wrong, "network does not fit"), (bare, "no config")):
        assert cli.eval_main([path, "--out", str(tmp_path / "ev"), "--no-progress"]) == 2, path
        assert words in error_line("daal-eval"), path
        assert cli.main(["--resume", path, "--epochs", "2", "--no-progress"]) == 2, path
        assert words in error_line("daal-train"), path
    assert not (tmp_path / "ev").exists() and sorted(os.listdir(tmp_path / "wrong")) == ["checkpoint_last.pt"]


FORGED = {  # a checkpoint of another version, or edited and signed again: what each entry breaks
    "dataset": (dict(config={"dataset": "imagenet"}), "dataset must be one of"),
    "augment": (dict(config={"augment": "bogus"}), "augment must be one of"),
    "knn_backend": (dict(config={"knn_backend": "faiss"}), "knn-backend must be one of"),
    "arch": (dict(config={"arch": "resnet50"}), "arch must be one of"),
    "width": (dict(config={"width": "0.25"}), "width must be float"),
    "image_size": (dict(config={"image_size": "32"}), "image_size must be int"),
    "epoch": (dict(epoch=-5), "not a count of trained epochs"),
    "metrics": (dict(metrics={"epoch": 1}), "not a list of per-epoch records"),
    "rng": (dict(rng={"torch": "x"}), "random-generator states are damaged"),
    # tracebacks where the records are compared or written, or the optimiser's state is read
    # (a run-folder probe, 2026-12-07)
    "metric-value": (dict(metrics=[{"epoch": 1, "model": "trained", "recall@1": "x"}]),
                     "not a list of per-epoch records"),
    "optimizer": (dict(optimizer="x"), "its optimizer state is not a state dict"),
    "resumes": (dict(resumes="x"), "its resumes are not a list"),
    "resumes-changed": (dict(resumes=[{"changed": "x"}]), "its resumes are not a list"),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_checkpoints_are_one_error_line(one_epoch, tmp_path, error_line, case):
    # every program that reads the checkpoint: one error line, no traceback, nothing written
    changes, words = FORGED[case]
    ck = _ck(one_epoch)
    if "config" in changes:
        changes = dict(changes, config=dict(ck["config"], **changes["config"]))
    os.makedirs(tmp_path / "run")
    path = _forge(_last(one_epoch), str(tmp_path / "run" / "checkpoint_last.pt"), **changes)
    assert cli.main(["--resume", path, "--epochs", "2", "--no-progress"]) == 2
    assert words in error_line("daal-train")
    if case != "rng":  # daal-eval reads all but the generators' states
        assert cli.eval_main([path, "--out", str(tmp_path / "ev"), "--no-progress"]) == 2
        assert words in error_line("daal-eval")
    assert os.listdir(tmp_path / "run") == ["checkpoint_last.pt"] and not (tmp_path / "ev").exists()


def test_resume_onto_data_with_other_classes_is_one_error_line(tmp_path, error_line):
    from PIL import Image
    import numpy as np

    def tree(root, train_classes):
        for split, classes in (("train", train_classes), ("test", ("x", "y"))):
            for c in classes:
                os.makedirs(os.path.join(root, split, c))
                for j in range(2):
                    Image.fromarray(np.full((8, 8, 3), 40 * j, np.uint8)).save(os.path.join(root, split, c, f"{j}.png"))

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    tree(a, ("p", "q", "r"))
    tree(b, ("p", "q", "r", "s"))
    out = str(tmp_path / "run")
    assert cli.main(["--dataset", "folder", "--data-root", a, "--image-size", "32", "--width", "0.125", "-P", "2",
                     "-K", "2", "--steps-per-epoch", "1", "--embedding-dim", "8", "--epochs", "2", "--stop-after",
                     "1", "--no-progress", "--no-tsne", "--no-baselines", "--out", out]) == 0
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    assert cli.main(["--resume", _last(out), "--data-root", b, "--no-progress"]) == 2
    line = error_line("daal-train")
    assert "trained on other classes" in line and "--data-root" in line and "(3 there, 4 here" in line
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before
    # as many classes, other ones: the segments would belong to other classes (it resumed silently)
    c = str(tmp_path / "c")
    tree(c, ("p", "q", "s"))
    assert cli.main(["--resume", _last(out), "--data-root", c, "--no-progress"]) == 2
    assert "class 2: 'r' there, 's' here" in error_line("daal-train")
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def _two_class_folder(root) -> None:
    """A --dataset folder tree at ``root``: train classes p, q and test classes x, y, two 8x8 images each."""
    from PIL import Image
    import numpy as np

    for split, classes in (("train", ("p", "q")), ("test", ("x", "y"))):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
            for j in range(2):
                Image.fromarray(np.full((8, 8, 3), 60 * j, np.uint8)).save(os.path.join(root, split, c, f"{j}.png"))


def test_a_relative_data_root_is_recorded_absolute(tmp_path, monkeypatch):
    """``--data-root data`` given in one folder: the run records the folder's absolute path, so
    daal-eval and --resume work from any other working directory (they looked for ./data there)."""
    _two_class_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--dataset", "folder", "--data-root", "data", "--image-size", "32", "--width", "0.125",
                     "-P", "2", "-K", "2", "--steps-per-epoch", "1", "--embedding-dim", "8", "--epochs", "2",
                     "--stop-after", "1", "--no-progress", "--no-tsne", "--no-baselines", "--out", "run"]) == 0
    assert json.load(open(tmp_path / "run" / "config.json"))["data_root"] == str(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.eval_main([str(tmp_path / "run" / "checkpoint_last.pt"), "--out", "ev", "--no-progress",
                          "--no-tsne"]) == 0
    assert cli.main(["--resume", str(tmp_path / "run" / "checkpoint_last.pt"), "--no-progress"]) == 0
    assert [json.loads(ln)["epoch"] for ln in open(tmp_path / "run" / "metrics.jsonl")][-1] == 2


def test_a_moved_data_root_on_resume_says_it_is_the_checkpoints(tmp_path, error_line):
    """The data set moved after the run started: the resume names the checkpoint's --data-root as
    missing and says to give --data-root (it printed a layout error about a missing train/)."""
    _two_class_folder(tmp_path / "data")
    out = str(tmp_path / "run")
    assert cli.main(["--dataset", "folder", "--data-root", str(tmp_path / "data"), "--image-size", "32", "--width",
                     "0.125", "-P", "2", "-K", "2", "--steps-per-epoch", "1", "--embedding-dim", "8", "--epochs", "2",
                     "--stop-after", "1", "--no-progress", "--no-tsne", "--no-baselines", "--out", out]) == 0
    os.rename(tmp_path / "data", tmp_path / "moved")
    assert cli.main(["--resume", _last(out), "--no-progress"]) == 2
    line = error_line("daal-train")
    assert f"--data-root {tmp_path / 'data'}: no such folder" in line, line
    assert f"is the setting of the checkpoint {_last(out)}" in line and "give --data-root to override it" in line
    assert cli.main(["--resume", _last(out), "--data-root", str(tmp_path / "moved"), "--no-progress"]) == 0
    assert [json.loads(ln)["epoch"] for ln in open(os.path.join(out, "metrics.jsonl"))][-1] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_a_checkpoint_device_that_is_not_here_says_where_it_comes_from(one_epoch, tmp_path, error_line):
    out = _copy(one_epoch, tmp_path)
    _forge(_last(out), _last(out), config=dict(_ck(out)["config"], device="cuda", knn_backend="triton"))
    assert cli.main(["--resume", _last(out), "--epochs", "2", "--no-progress"]) == 2
    line = error_line("daal-train")
    assert line.startswith("daal-train: error: --device cuda was asked for")
    assert f"is the setting of the checkpoint {_last(out)}" in line and "give --device to override it" in line
    assert cli.main(["--resume", _last(out), "--epochs", "2", "--device", "cpu", "--no-progress"]) == 2
    assert "--knn-backend triton is the setting of the checkpoint" in error_line("daal-train")
    assert cli.main(["--resume", _last(out), "--epochs", "2", "--device", "cpu", "--knn-backend", "auto",
                     "--no-progress"]) == 0


def test_restore_rng_restores_python_numpy_and_torch():
    """A checkpoint's ``rng`` (checkpoint.rng_state) puts back all three generators: Python's
    ``random``, NumPy's global one and torch's, so each draws after restore_rng what it drew after
    rng_state."""
    import random

    import numpy as np

    from daal_triton.train.checkpoint import restore_rng, rng_state

    def draw():
        return ([random.random() for _ in range(3)], random.gauss(0, 1), np.random.rand(3).tolist(),
                np.random.randn(), torch.rand(3).tolist())

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # Python's gauss keeps a spare value: part of the state
    state = rng_state()
    first = draw()
    assert draw() != first  # the generators moved on
    restore_rng(state)
    assert draw() == first


def test_a_resumed_run_needs_no_weights_file(tmp_path, monkeypatch):
    """``--weights`` is recorded absolute (a relative path named another file, or none, from any
    other working directory); a resumed run's trunk comes from its checkpoint, so the file is
    neither required nor read (runs recorded relative could not be resumed elsewhere, and the
    error's advice, "give --weights", was then refused as a change of the network); a path given
    again that names the same file is no change."""
    from daal_triton.train import config, engine, model

    weights = tmp_path / "w" / "vgg.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"not read")
    monkeypatch.chdir(weights.parent)
    cfg = cli.config_from_args(cli.build_parser().parse_args(["--weights", "vgg.pth"]))
    assert cfg.weights == str(weights)
    monkeypatch.chdir(tmp_path)
    saved = dict(cfg.to_dict(), weights="vgg.pth")  # as runs before this recorded it
    resumed = config.TrainConfig.from_dict(dict(saved, resume=str(tmp_path / "run" / "checkpoint_last.pt")))
    config.validate_config(resumed, 1, torch.device("cpu"))  # no "--weights vgg.pth: no such file"

    def never(*args, **kwargs):
        raise AssertionError("a resumed run read its --weights file")

    monkeypatch.setattr(model, "load_vgg_weights", never)
    engine.build_model(dataclasses_replace(resumed, embedding_dim=8))
    asked = config.TrainConfig.from_dict(dict(resumed.to_dict(), weights=str(weights)))
    same, changes = config.resume_config(dict(cfg.to_dict()), asked, given={"weights"})
    assert same.weights == str(weights) and "weights" not in changes
    monkeypatch.chdir(weights.parent)  # the recorded relative path names the file given again
    config.resume_config(saved, asked, given={"weights"})
    other = tmp_path / "other.pth"
    other.write_bytes(b"another file")
    with pytest.raises(config.ConfigError, match="--weights"):
        config.resume_config(saved, config.TrainConfig.from_dict(dict(resumed.to_dict(), weights=str(other))),
                             given={"weights"})


def test_a_checkpoint_copied_into_another_runs_folder_does_not_write_over_it(one_epoch, tmp_path, error_line):
    """``checkpoint_last.pt`` of one run copied into another run's folder and resumed there would
    write over that run's config.json, metrics, table and plots (and take its best checkpoint for
    its own): refused when that folder's config.json differs in what a resume keeps; the run's own
    checkpoint there resumes as before."""
    other = _copy(one_epoch, tmp_path, "other")
    cfg_path = os.path.join(other, "config.json")
    there = json.load(open(cfg_path))
    there["seed"] = there["seed"] + 1  # another run (another seed) in that folder
    with open(cfg_path, "w") as f:
        json.dump(there, f)
    before = {n: open(os.path.join(other, n), "rb").read() for n in os.listdir(other)
              if os.path.isfile(os.path.join(other, n))}
    assert cli.main(["--resume", _last(other), "--epochs", "2", "--no-progress"]) == 2
    line = error_line("daal-train")
    assert "is another run" in line and "--seed" in line and "another --out" in line, line
    assert before == {n: open(os.path.join(other, n), "rb").read() for n in os.listdir(other)
                      if os.path.isfile(os.path.join(other, n))}
    assert cli.main(["--resume", _last(other), "--epochs", "2", "--out", str(tmp_path / "new"), "--no-progress"]) == 0


def test_a_resume_that_diverges_says_how_to_resume_again_with_its_threads(one_epoch, tmp_path, error_line,
                                                                          monkeypatch):
    """A resumed run that diverges names the command to resume again with ``--threads`` on the CPU,
    as an interrupted run's line does: a bit-identical resume needs the same thread count (the
    line named ``--resume`` alone: noticed 2026-12-07)."""
    from daal_triton.train import engine

    real = engine.GlobalBatchLoss.__call__
    monkeypatch.setattr(engine.GlobalBatchLoss, "__call__",
                        lambda self, criterion, embeddings, labels: real(self, criterion, embeddings, labels)
                        + float("inf"))
    out = _copy(one_epoch, tmp_path)
    assert cli.main(["--resume", _last(out), "--epochs", "2", "--no-progress"]) == 1
    line = error_line("daal-train")
    assert "training diverged in epoch 2 of 2" in line, line
    assert f"resume again with daal-train --resume {_last(out)} --threads {torch.get_num_threads()}" in line, line
