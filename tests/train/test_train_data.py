"""The data sets of the training program: tiny fake trees of each on-disk layout, the embedded
sets, and the P x K sampler."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")

from daal_triton.train.data import DatasetLayoutError, PKSampler, build_datasets  # noqa: E402
from daal_triton.train.data import shapes as S  # noqa: E402


def _png(path, value=0):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(path)


def _check(ds, n_images, n_classes):
    assert len(ds) == n_images
    assert ds.num_classes == n_classes
    assert sorted(set(ds.labels.tolist())) == list(range(n_classes))  # contiguous from 0
    img, y = ds[0]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y < n_classes


def test_shapes_shows_a_bar_while_it_draws(monkeypatch):
    """Drawing the shapes set at a large --image-size takes minutes of silence otherwise: a tqdm
    bar (shown once it has taken a second) counts the images; the images are the same with it."""
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total=None, **kwargs):
            self.total, self.n, self.closed, self.kwargs = total, 0, False, kwargs
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    quiet = S.generate(range(3), 2, 16, 0)
    assert bars == []
    shown = S.generate(range(3), 2, 16, 0, progress=True)
    assert all(np.array_equal(a, b) for a, b in zip(quiet, shown))
    assert len(bars) == 1 and bars[0].total == bars[0].n == 6 and bars[0].closed and bars[0].kwargs["delay"] > 0
    build_datasets("shapes", image_size=16, shapes_train_per_class=2, shapes_test_per_class=1, progress=True)
    assert [(b.kwargs["desc"], b.total) for b in bars[1:]] == [("shapes (train)", 24), ("shapes (test)", 12)]


# ------------------------------------------------------------------------------------ cub200

def _fake_cub(root, classes=(1, 2, 100, 101, 150, 200), per_class=2):
    base = os.path.join(root, "CUB_200_2011")
    lines, labels, names = [], [], []
    i = 0
    for c in classes:
        names.append(f"{c} {c:03d}.Bird_{c}")
        for j in range(per_class):
            i += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{j}.jpg"
            _png(os.path.join(base, "images", rel), value=c)
            lines.append(f"{i} {rel}")
            labels.append(f"{i} {c}")
    for name, rows in (("images.txt", lines), ("image_class_labels.txt", labels), ("classes.txt", names)):
        with open(os.path.join(base, name), "w") as f:
            f.write("\n".join(rows) + "\n")
    return base


def test_cub200_split_and_labels(tmp_path):
    _fake_cub(str(tmp_path))
    train, test = build_datasets("cub200", str(tmp_path), 16)
    _check(train, 6, 3)  # classes 1, 2, 100
    _check(test, 6, 3)  # classes 101, 150, 200
    assert train.class_names[-1].startswith("100.")
    assert test.class_names[0].startswith("101.")
    # the file of class 150 (second test class) maps to label 1
    i = [k for k, p in enumerate(test.paths) if "Bird_150_" in p][0]
    assert test.labels[i] == 1


def test_cub200_root_can_be_the_dataset_folder(tmp_path):
    base = _fake_cub(str(tmp_path))
    train, _ = build_datasets("cub200", base, 16)
    assert train.num_classes == 3


def test_cub200_damaged_lists_name_the_file(tmp_path):
    base = _fake_cub(str(tmp_path))
    labels = os.path.join(base, "image_class_labels.txt")
    with open(labels, "a") as f:
        f.write("13 sparrow\n")
    with pytest.raises(DatasetLayoutError, match=r"labels.txt, line 13: expected an integer, got 'sparrow'"):
        build_datasets("cub200", str(tmp_path), 16)
    with open(labels, "wb") as f:
        f.write(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetLayoutError, match="image_class_labels.txt"):
        build_datasets("cub200", str(tmp_path), 16)


def test_cub200_missing_files_names_layout(tmp_path):
    with pytest.raises(DatasetLayoutError, match="image_class_labels.txt"):
        build_datasets("cub200", str(tmp_path), 16)
    base = _fake_cub(str(tmp_path))
    os.remove(os.path.join(base, "image_class_labels.txt"))
    with pytest.raises(DatasetLayoutError, match="missing image_class_labels.txt"):
        build_datasets("cub200", str(tmp_path), 16)


# ------------------------------------------------------------------------------------ cars196

def _savemat(path, **arrays):
    import scipy.io as sio

    os.makedirs(os.path.dirname(path), exist_ok=True)
    sio.savemat(path, arrays)


def _struct(rows, fields):
    arr = np.zeros((len(rows),), dtype=[(f, object) for f in fields])
    for i, r in enumerate(rows):
        arr[i] = r
    return arr


def test_cars196_annos_layout(tmp_path):
    classes = (1, 50, 98, 99, 150, 196)
    rows = []
    for i, c in enumerate(classes * 2):
        rel = f"car_ims/{i + 1:06d}.jpg"
        _png(os.path.join(str(tmp_path), rel), value=c)
        rows.append((rel, c, i % 2))
    names = np.array([f"Car {c}" for c in range(1, 197)], dtype=object)
    _savemat(os.path.join(str(tmp_path), "cars_annos.mat"),
             annotations=_struct(rows, ("relative_im_path", "class", "test")), class_names=names)
    train, test = build_datasets("cars196", str(tmp_path), 16)
    _check(train, 6, 3)
    _check(test, 6, 3)
    assert train.class_names == ["Car 1", "Car 50", "Car 98"]
    assert test.class_names == ["Car 99", "Car 150", "Car 196"]


def test_cars196_torchvision_layout(tmp_path):
    base = os.path.join(str(tmp_path), "stanford_cars")
    tr_rows, te_rows = [], []
    for i, c in enumerate((1, 98, 99, 196)):
        for split, rows in (("cars_train", tr_rows), ("cars_test", te_rows)):
            fname = f"{i:05d}.jpg"
            _png(os.path.join(base, split, fname), value=c)
            rows.append((fname, c))
    _savemat(os.path.join(base, "devkit", "cars_train_annos.mat"), annotations=_struct(tr_rows, ("fname", "class")))
    _savemat(os.path.join(base, "cars_test_annos_withlabels.mat"), annotations=_struct(te_rows, ("fname", "class")))
    _savemat(os.path.join(base, "devkit", "cars_meta.mat"),
             class_names=np.array([f"C{c}" for c in range(1, 197)], dtype=object))
    train, test = build_datasets("cars196", str(tmp_path), 16)
    _check(train, 4, 2)  # classes 1 and 98, from both official halves
    _check(test, 4, 2)
    assert test.class_names == ["C99", "C196"]


def test_cars196_damaged_mat_files_name_the_file(tmp_path):
    mat = os.path.join(str(tmp_path), "cars_annos.mat")
    with open(mat, "wb") as f:
        f.write(os.urandom(3000))
    with pytest.raises(DatasetLayoutError, match="cars_annos.mat"):
        build_datasets("cars196", str(tmp_path), 16)
    _savemat(mat, something_else=np.zeros(3))
    with pytest.raises(DatasetLayoutError, match="cars_annos.mat holds no 'annotations'"):
        build_datasets("cars196", str(tmp_path), 16)
    _savemat(mat, annotations=_struct([("car_ims/1.jpg", 1), ("car_ims/2.jpg", "x")], ("relative_im_path", "class")))
    with pytest.raises(DatasetLayoutError, match="cars_annos.mat: a class that is not an integer"):
        build_datasets("cars196", str(tmp_path), 16)


def test_cars196_missing(tmp_path):
    with pytest.raises(DatasetLayoutError, match="cars_annos.mat"):
        build_datasets("cars196", str(tmp_path), 16)


# ------------------------------------------------------------------------------------ sop

def test_sop_own_split(tmp_path):
    base = os.path.join(str(tmp_path), "Stanford_Online_Products")
    for split, classes in (("train", (1, 2, 5)), ("test", (11319, 11320))):
        lines = ["image_id class_id super_class_id path"]
        for i, c in enumerate(classes * 2):
            rel = f"bicycle_final/{c}_{i}.JPG"
            _png(os.path.join(base, rel), value=c % 255)
            lines.append(f"{i + 1} {c} 1 {rel}")
        with open(os.path.join(base, f"Ebay_{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    train, test = build_datasets("sop", str(tmp_path), 16)
    _check(train, 6, 3)
    _check(test, 4, 2)
    assert test.class_names == ["11319", "11320"]


@pytest.mark.parametrize("lists,words", [
    ("image_id class_id super_class_id path\n1 1 1 a.JPG\n2 bike 1 b.JPG\n",
     "Ebay_train.txt, line 3: expected an integer, got 'bike'"),
    # not "cannot read ... as UTF-8 text": the file reads; its first line is wrong
    ("1 1 1 a.JPG\n", "Ebay_train.txt should start with the header 'image_id class_id super_class_id path', "
                      "got '1 1 1 a.JPG'")])
def test_sop_list_errors_name_the_file_and_the_fault(tmp_path, lists, words):
    base = os.path.join(str(tmp_path), "Stanford_Online_Products")
    os.makedirs(base)
    for split in ("train", "test"):
        with open(os.path.join(base, f"Ebay_{split}.txt"), "w") as f:
            f.write(lists)
    with pytest.raises(DatasetLayoutError) as err:
        build_datasets("sop", str(tmp_path), 16)
    assert str(err.value) == f"sop: {base}/{words}"


def test_sop_missing(tmp_path):
    with pytest.raises(DatasetLayoutError, match="Ebay_train.txt"):
        build_datasets("sop", str(tmp_path), 16)


# ------------------------------------------------------------------------------------ folder

def test_folder_tree(tmp_path):
    for split, classes in (("train", ("ant", "bee", "cat")), ("test", ("dog", "eel"))):
        for c in classes:
            for j in range(2):
                _png(os.path.join(str(tmp_path), split, c, f"{j}.png"))
    os.makedirs(os.path.join(str(tmp_path), "test", "empty"))
    train, test = build_datasets("folder", str(tmp_path), 16)
    _check(train, 6, 3)
    _check(test, 4, 2)
    assert test.class_names == ["dog", "eel"]


def test_an_unreadable_image_is_one_error_line(tmp_path, error_line):
    from daal_triton.train import cli

    for split, classes in (("train", ("ant", "bee")), ("test", ("dog", "eel"))):
        for c in classes:
            for j in range(2):
                _png(os.path.join(str(tmp_path), split, c, f"{j}.png"))
    bad = os.path.join(str(tmp_path), "test", "eel", "1.png")
    with open(bad, "wb") as f:
        f.write(b"not a png")
    _, test = build_datasets("folder", str(tmp_path), 32)
    with pytest.raises(DatasetLayoutError, match="cannot read the image .*1.png"):
        test[3]
    out = str(tmp_path / "out")
    assert cli.main(["--dataset", "folder", "--data-root", str(tmp_path), "--image-size", "32", "--width", "0.125",
                     "-P", "2", "-K", "2", "--steps-per-epoch", "1", "--epochs", "1", "--embedding-dim", "8",
                     "--no-progress", "--no-tsne", "--out", out]) == 2
    assert bad in error_line("daal-train")


def test_folder_refuses_files_that_cannot_be_images_and_says_what_it_leaves_out(tmp_path, capsys, error_line):
    """An empty file or a link to nothing among the images is refused when the data loads (it
    failed at the first read, after --overwrite had removed the old run); a file of another type
    and a class folder without images are left out, and the run's log says so."""
    from daal_triton.train import cli

    root = str(tmp_path / "tree")
    for split, classes in (("train", ("ant", "bee")), ("test", ("dog", "eel"))):
        for c in classes:
            for j in range(2):
                _png(os.path.join(root, split, c, f"{j}.png"))
    open(os.path.join(root, "train", "ant", "clip.gif"), "wb").write(b"GIF89a")
    open(os.path.join(root, "train", "bee", "notes.txt"), "w").write("x")
    open(os.path.join(root, "train", "bee", "README"), "w").write("x")
    os.makedirs(os.path.join(root, "test", "fox", "sub"))
    train, test = build_datasets("folder", root, 16)
    assert len(train) == 4 and len(test) == 4
    assert len(train.notes) == 1 and "train/: left out 3 files" in train.notes[0]
    assert ".gif (1)" in train.notes[0] and ".txt (1)" in train.notes[0] and "no extension (1)" in train.notes[0]
    assert test.notes == ["folder: test/: left out 1 class folder without images: fox"]
    flags = ["--dataset", "folder", "--data-root", root, "--image-size", "32", "--width", "0.125", "-P", "2", "-K", "2",
             "--steps-per-epoch", "1", "--epochs", "1", "--embedding-dim", "8", "--no-progress", "--no-tsne",
             "--no-baselines", "--eval-every", "0", "--save", "none"]
    assert cli.main(flags + ["--out", str(tmp_path / "run")]) == 0
    log = capsys.readouterr().out
    assert train.notes[0] in log and test.notes[0] in log
    empty = os.path.join(root, "test", "eel", "2.png")
    open(empty, "wb").close()
    with pytest.raises(DatasetLayoutError, match=r"1 file under .*test' cannot be read as images: .*2.png \(empty\)"):
        build_datasets("folder", root, 16)
    os.remove(empty)
    gone = os.path.join(root, "test", "gone")  # a class folder that is a link to nothing
    os.symlink(str(tmp_path / "nowhere"), gone)
    with pytest.raises(DatasetLayoutError, match=r"test/gone \(a link to nothing\): replace or remove them"):
        build_datasets("folder", root, 16)
    os.remove(gone)
    dead = os.path.join(root, "train", "ant", "gone.jpg")
    os.symlink(str(tmp_path / "nowhere.jpg"), dead)
    with pytest.raises(DatasetLayoutError, match=r"gone.jpg \(a link to nothing\): replace or remove them"):
        build_datasets("folder", root, 16)
    out = str(tmp_path / "run")  # the finished run above: --overwrite keeps it when the data is refused
    assert cli.main(flags + ["--out", out, "--overwrite"]) == 2
    assert dead in error_line("daal-train")
    assert os.path.isfile(os.path.join(out, "metrics.jsonl"))


@pytest.mark.parametrize("test_images,words", [
    ({"dog": 1, "eel": 2}, ["1 of the 2 test classes has a single image"]),
    ({"dog": 2}, ["the test split has one class"]),
    ({"dog": 1, "eel": 1}, ["every test class has a single image", "NaN (and no checkpoint_best.pt",
                                   "NMI is 1 for any network that tells the images apart"]),
    ({"dog": 2, "eel": 2}, []),
], ids=["one-lone-class", "one-class", "all-lone", "fine"])
def test_a_test_split_that_cannot_measure_retrieval_is_said_so(test_images, words, tmp_path, capsys):
    """Held-out classes of one image count in no retrieval metric, and a single held-out class
    makes every metric 1: the log says so when the data loads (daal-train and daal-eval), as it
    does for training classes with fewer than K images."""
    from daal_triton.train import cli

    root = str(tmp_path / "tree")
    for split, counts in (("train", {"ant": 3, "bee": 1}), ("test", test_images)):
        for c, n in counts.items():
            for j in range(n):
                _png(os.path.join(root, split, c, f"{j}.png"))
    out = str(tmp_path / "run")
    assert cli.main(["--dataset", "folder", "--data-root", root, "--image-size", "32", "--width", "0.125", "-P", "2",
                     "-K", "2", "--steps-per-epoch", "1", "--epochs", "1", "--embedding-dim", "8", "--no-progress",
                     "--no-tsne", "--no-baselines", "--out", out]) == 0
    log = capsys.readouterr().out
    assert "1 of the 2 training classes has fewer than --samples-per-class (K) = 2 images" in log
    for w in words:
        assert w in log, log
    said = [ln for ln in log.splitlines() if "test split" in ln or "test class" in ln]
    assert len(said) == (1 if words else 0), said  # one line, and none for a split that measures
    assert os.path.isfile(os.path.join(out, "checkpoint_best.pt")) == (test_images != {"dog": 1, "eel": 1})
    assert cli.eval_main([os.path.join(out, "checkpoint_last.pt"), "--no-progress", "--no-tsne"]) == 0
    log = capsys.readouterr().out
    assert all(w in log for w in words) and "training classes" not in log
    if not words:  # another data set than the checkpoint's: its folder is not inherited (it was refused)
        ev = tmp_path / "shapes"
        assert cli.eval_main([os.path.join(out, "checkpoint_last.pt"), "--no-progress", "--no-tsne", "--dataset",
                              "shapes", "--out", str(ev)]) == 0
        res = json.load(open(ev / "eval.json"))
        assert res["dataset"] == "shapes" and res["data_root"] is None and res["test_classes"] == 12


def test_folder_missing_and_no_root(tmp_path):
    with pytest.raises(DatasetLayoutError, match="train/<class name>"):
        build_datasets("folder", str(tmp_path), 16)
    with pytest.raises(DatasetLayoutError, match="--data-root"):
        build_datasets("folder", None, 16)


# ------------------------------------------------------------------------------------ what users' copies hold

def test_listed_sets_check_their_index_when_loaded(tmp_path):
    # a listed image missing on disk, an empty split, ids out of range or twice, a list file that
    # is a folder: refused when the data loads, before any training (they surfaced at the first
    # evaluation, or as tracebacks)
    base = _fake_cub(str(tmp_path / "missing"))
    os.remove(os.path.join(base, "images", "150.Bird_150", "Bird_150_1.jpg"))
    with pytest.raises(DatasetLayoutError, match=r"cub200: 1 of the 12 images images.txt lists are missing .*restore"):
        build_datasets("cub200", str(tmp_path / "missing"), 16)
    base = _fake_cub(str(tmp_path / "empty"))
    open(os.path.join(base, "images", "150.Bird_150", "Bird_150_1.jpg"), "wb").close()  # a copy cut short
    with pytest.raises(DatasetLayoutError, match=r"cub200: 1 of the 12 images images.txt lists are empty files"):
        build_datasets("cub200", str(tmp_path / "empty"), 16)
    _fake_cub(str(tmp_path / "train_only"), classes=(1, 2))
    with pytest.raises(DatasetLayoutError, match="cub200: no test images"):
        build_datasets("cub200", str(tmp_path / "train_only"), 16)
    base = _fake_cub(str(tmp_path / "range"), classes=(1, 101, 201))
    with pytest.raises(DatasetLayoutError, match=r"class ids outside 1..200 \(\[201\]\)"):
        build_datasets("cub200", str(tmp_path / "range"), 16)
    base = _fake_cub(str(tmp_path / "twice"))
    with open(os.path.join(base, "images.txt"), "a") as f:
        f.write("1 001.Bird_1/Bird_1_1.jpg\n")
    with pytest.raises(DatasetLayoutError, match="images.txt, line 13: image id 1 is listed twice"):
        build_datasets("cub200", str(tmp_path / "twice"), 16)
    base = _fake_cub(str(tmp_path / "bom"))
    for name in ("images.txt", "image_class_labels.txt"):  # saved by an editor with a byte-order mark
        path = os.path.join(base, name)
        text = open(path, encoding="utf-8").read()
        open(path, "w", encoding="utf-8-sig").write(text)
    assert len(build_datasets("cub200", str(tmp_path / "bom"), 16)[0]) == 6
    sop = os.path.join(str(tmp_path / "sop"), "Stanford_Online_Products")
    os.makedirs(os.path.join(sop, "Ebay_train.txt"))
    open(os.path.join(sop, "Ebay_test.txt"), "w").write("image_id class_id super_class_id path\n")
    with pytest.raises(DatasetLayoutError, match="sop: cannot read .*Ebay_train.txt"):
        build_datasets("sop", str(tmp_path / "sop"), 16)


def test_cars196_with_a_single_annotation(tmp_path):
    # scipy squeezes a 1 x 1 struct to a 0-d array: one image is still an image
    _png(os.path.join(str(tmp_path), "car_ims", "000001.jpg"))
    _savemat(os.path.join(str(tmp_path), "cars_annos.mat"),
             annotations=_struct([("car_ims/000001.jpg", 1, 0)], ("relative_im_path", "class", "test")),
             class_names=np.array(["Car 1"], dtype=object))
    with pytest.raises(DatasetLayoutError, match="cars196: no test images"):  # read, then found one-sided
        build_datasets("cars196", str(tmp_path), 16)


def test_folder_skips_hidden_follows_links_and_refuses_shared_classes(tmp_path):
    root = str(tmp_path / "tree")
    for split, classes in (("train", ("ant", "bee")), ("test", ("dog", "eel"))):
        for c in classes:
            _png(os.path.join(root, split, c, "0.png"))
    _png(os.path.join(root, "train", "__MACOSX", "ant", "0.png"))  # an archive's leftovers
    open(os.path.join(root, "train", "ant", "._0.png"), "wb").write(b"\x00\x05\x16\x07")
    elsewhere = str(tmp_path / "elsewhere")
    _png(os.path.join(elsewhere, "1.png"))
    os.symlink(elsewhere, os.path.join(root, "train", "bee", "more"))  # a linked subfolder of a class
    _png(os.path.join(root, "train", "ant", ".thumbs", "t.png"))  # a hidden subfolder
    os.symlink("..", os.path.join(root, "train", "bee", "loop"))  # a link back up: no copies, no wrong labels
    train, test = build_datasets("folder", root, 16)
    assert train.class_names == ["ant", "bee"] and len(train) == 3, train.paths
    assert not any("MACOSX" in p or "._" in p for p in train.paths)
    _png(os.path.join(root, "test", "ant", "0.png"))
    with pytest.raises(DatasetLayoutError, match="train/ and test/ share the classes ant"):
        build_datasets("folder", root, 16)


def test_image_modes_orientation_and_bombs(tmp_path, monkeypatch):
    from PIL import Image

    from daal_triton.train.data.base import ImageFileDataset

    paths = {}
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    paths["i16"] = str(tmp_path / "ramp16.png")
    Image.fromarray(ramp).save(paths["i16"])
    paths["f"] = str(tmp_path / "f.tif")
    Image.fromarray(ramp.astype(np.float32) / 65535.0).save(paths["f"])
    paths["exif"] = str(tmp_path / "exif.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: shown upright it is 10 wide and 20 high
    Image.new("RGB", (20, 10), (200, 10, 10)).save(paths["exif"], exif=exif)
    ds = ImageFileDataset(list(paths.values()), [0, 0, 0], ["x"], transform=None)
    for (name, _), (img, _) in zip(paths.items(), (ds[i] for i in range(3))):
        a = np.asarray(img)
        if name == "exif":
            assert img.size == (10, 20)
        else:  # a full range, not clipped to white (16-bit) or black (float)
            assert a.min() == 0 and a.max() == 255 and 100 < a.mean() < 155, (name, a.min(), a.max(), a.mean())
    big = str(tmp_path / "big.png")  # over twice PIL's pixel limit (lowered here: 400 MP otherwise)
    Image.new("L", (100, 100)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DatasetLayoutError, match="cannot read the image .*big.png .*DecompressionBombError"):
        ImageFileDataset([big], [0], ["x"])[0]


# ------------------------------------------------------------------------------------ embedded

def test_shapes_split_modes_and_seed():
    train, test = build_datasets("shapes", None, 32, seed=3, shapes_train_per_class=8, shapes_test_per_class=4)
    assert (len(train), len(test)) == (96, 48)
    assert train.num_classes == test.num_classes == 12
    assert sorted(set(train.labels.tolist())) == list(range(12))
    assert sorted(set(test.labels.tolist())) == list(range(12))
    assert set(train.class_names).isdisjoint(test.class_names)
    for ds in (train, test):  # every class appears in every mode (palette), balanced
        for c in range(12):
            assert np.bincount(ds.modes[ds.labels == c], minlength=4).min() == len(ds) // 48
    img, _ = train[0]
    assert img.shape == (3, 32, 32)
    again, _ = build_datasets("shapes", None, 32, seed=3, shapes_train_per_class=8, shapes_test_per_class=4)
    assert torch.equal(again.images, train.images)
    other, _ = build_datasets("shapes", None, 32, seed=4, shapes_train_per_class=8, shapes_test_per_class=4)
    assert not torch.equal(other.images, train.images)


def test_shapes_class_design():
    table = S.class_table()
    assert len(table) == len(set(table)) == 24
    train, test = table[:12], table[12:]
    for half in (train, test):  # every shape twice, every pattern three times in each half
        assert sorted(np.bincount([s for s, _ in half]).tolist()) == [2] * 6
        assert sorted(np.bincount([p for _, p in half]).tolist()) == [3] * 4


def test_shapes_render_is_seeded():
    a = S.render(4, 2, 1, 24, np.random.default_rng(7))
    b = S.render(4, 2, 1, 24, np.random.default_rng(7))
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_digits_split():
    train, test = build_datasets("digits", None, 16)
    assert train.num_classes == test.num_classes == 5
    assert len(train) + len(test) == 1797
    assert sorted(set(test.labels.tolist())) == list(range(5))
    assert test.class_names == ["5", "6", "7", "8", "9"]
    assert train[0][0].shape == (3, 16, 16)


# ------------------------------------------------------------------------------------ sampler

def test_pk_sampler_balanced_and_deterministic():
    labels = np.repeat(np.arange(6), [10, 10, 10, 10, 10, 2])
    s = PKSampler(labels, 4, 3, seed=1)
    assert len(s) == len(labels) // 12 and s.batch_size == 12
    batches = list(s)
    for b in batches:
        assert len(b) == 12
        counts = np.bincount(labels[b], minlength=6)
        assert sorted(counts[counts > 0].tolist()) == [3, 3, 3, 3]
    assert batches == list(s)  # same epoch, same draw
    s.set_epoch(1)
    assert batches != list(s)


def test_pk_sampler_more_classes_per_batch_than_classes():
    s = PKSampler([0, 0, 1, 1, 1], 8, 2, batches_per_epoch=3)
    assert len(s) == 3 and all(len(b) == 4 for b in s)
    with pytest.raises(ValueError):
        PKSampler([0, 1], 0, 2)


def test_pk_sampler_draws_distinct_images_of_a_class_that_has_k():
    """A class with at least K images gives K distinct images (drawn without replacement); only a
    smaller class repeats images. Every class here holds exactly K = 3."""
    labels = np.repeat(np.arange(5), 3)
    s = PKSampler(labels, 4, 3, batches_per_epoch=20, seed=0)
    for epoch in range(3):
        s.set_epoch(epoch)
        for b in s:
            assert len(set(b)) == len(b) == 12, b
    small = PKSampler([0, 0, 1, 1, 1], 2, 3, batches_per_epoch=5)  # class 0 has 2 < K: repeats allowed
    assert all(len(b) == 6 for b in small)


@pytest.mark.parametrize("augment", ["none", "shift", "crop"])
def test_tensor_augmentations_keep_the_size_and_vary_only_in_training(augment):
    """``--augment`` for the in-memory sets: every choice gives ``image_size`` squares; "shift" and
    "crop" draw a new image each time in training, and none of them changes a test image."""
    from daal_triton.train.data.base import tensor_transforms

    torch.manual_seed(0)
    img = torch.rand(3, 20, 20)
    train = tensor_transforms(16, True, augment=augment)
    draws = [train(img) for _ in range(4)]
    assert all(d.shape == (3, 16, 16) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:]) == (augment != "none")
    test = tensor_transforms(16, False, augment=augment)
    assert torch.equal(test(img), tensor_transforms(16, False)(img))


# ------------------------------------------------------------------- folder: a probe of real trees

def _split_tree(root, train=("ant", "bee"), test=("dog", "eel"), n=2):
    for split, classes in (("train", train), ("test", test)):
        for c in classes:
            for j in range(n):
                _png(os.path.join(root, split, c, f"{j}.png"), value=10 * j)


def test_folder_says_when_one_file_is_under_two_labels_or_in_both_splits(tmp_path):
    """A folder probe (2026-12-07): a class folder linked to a sibling class, a file linked or hard
    linked into another class, or a test class linked to a training one put the same images under
    two labels, or trained on the test images, without a word. The log says so, naming a file (not
    refused: content-addressed stores such as git-annex link identical pictures); the same file
    twice in one class too."""
    root = str(tmp_path / "t")
    _split_tree(root)
    os.symlink("ant", os.path.join(root, "train", "ant2"))
    train, _ = build_datasets("folder", root, 16)
    assert any("2 images are the same file as an image of another class" in n and "ant2/0.png (as " in n
               for n in train.notes), train.notes
    os.remove(os.path.join(root, "train", "ant2"))
    os.link(os.path.join(root, "train", "ant", "0.png"), os.path.join(root, "train", "bee", "hard.png"))
    train, _ = build_datasets("folder", root, 16)
    assert any("1 image is the same file as an image of another class" in n and "bee/hard.png" in n
               for n in train.notes), train.notes
    os.remove(os.path.join(root, "train", "bee", "hard.png"))
    os.symlink(os.path.join(root, "train", "ant"), os.path.join(root, "test", "zebra"))
    _, test = build_datasets("folder", root, 16)
    assert any("2 images of test/ are also in train/" in n and "test/zebra/0.png" in n for n in test.notes), test.notes
    os.remove(os.path.join(root, "test", "zebra"))
    os.symlink("0.png", os.path.join(root, "test", "dog", "again.png"))
    train, test = build_datasets("folder", root, 16)
    assert len(test) == 5 and any("1 image is the same file as another of its class" in n for n in test.notes)
    assert not any("same file" in n for n in train.notes)


def test_folder_refuses_folders_it_cannot_read_and_notes_loose_files(tmp_path):
    """Unreadable folders were left out unsaid (a class's 3 images "without images", a subfolder's
    images gone); images put beside the class folders were ignored without a note."""
    root = str(tmp_path / "t")
    _split_tree(root)
    _png(os.path.join(root, "train", "loose.png"))
    train, _ = build_datasets("folder", root, 16)
    assert any("left out 1 file beside the class folders (loose.png)" in n for n in train.notes), train.notes
    if os.geteuid() == 0:  # root reads through chmod: stand for a folder os.walk cannot list
        import daal_triton.train.data.folder as F

        real_walk = os.walk

        def walk(top, onerror=None, followlinks=False):
            if top.endswith("bee"):
                onerror(PermissionError(13, "Permission denied", top))
                return iter(())
            return real_walk(top, onerror=onerror, followlinks=followlinks)

        F.os.walk, restore = walk, real_walk
    else:
        os.chmod(os.path.join(root, "train", "bee"), 0)
        restore = None
    try:
        with pytest.raises(DatasetLayoutError, match=r"bee \(a folder that cannot be read: Permission denied\)"):
            build_datasets("folder", root, 16)
    finally:
        if restore is not None:
            F.os.walk = restore
        else:
            os.chmod(os.path.join(root, "train", "bee"), 0o755)


def test_folder_class_names_by_their_bytes_and_unicode_forms(tmp_path):
    """Names that are not UTF-8 became U+FFFD: two folders one name (and a false "shared" refusal
    between splits); names that differ only in Unicode normal form (macOS's e + U+0301 against é)
    were two classes across the splits. Escaped bytes keep them apart; normal forms are compared."""
    root = str(tmp_path / "t")
    _split_tree(root, train=("a", "b"), test=("c", "d"))
    try:
        os.rename(os.path.join(root, "train", "a"), os.path.join(root, "train", os.fsdecode(b"caf\xe9")))
    except (OSError, UnicodeError):  # APFS, ZFS with utf8only: such names cannot exist there
        pytest.skip("this file system refuses names that are not UTF-8")
    os.rename(os.path.join(root, "train", "b"), os.path.join(root, "train", os.fsdecode(b"caf\xe8")))
    os.rename(os.path.join(root, "test", "c"), os.path.join(root, "test", os.fsdecode(b"caf\xea")))
    train, test = build_datasets("folder", root, 16)
    assert train.class_names == ["caf\\xe8", "caf\\xe9"] and "caf\\xea" in test.class_names
    # a checkpoint from before, which recorded those names with U+FFFD, still resumes on them
    from daal_triton.train.run import CheckpointError, _check_classes

    _check_classes(["caf\ufffd", "caf\ufffd"], train.class_names, "old.pt", "folder")
    with pytest.raises(CheckpointError, match="trained on other classes"):
        _check_classes(["caf\ufffd", "cafe"], train.class_names, "old.pt", "folder")
    os.rename(os.path.join(root, "test", "d"), os.path.join(root, "test", "cafe\u0301"))
    os.rename(os.path.join(root, "train", os.fsdecode(b"caf\xe8")), os.path.join(root, "train", "caf\u00e9"))
    with pytest.raises(DatasetLayoutError, match="train/ and test/ share the classes cafe\u0301"):
        build_datasets("folder", root, 16)


def test_daal_eval_reads_the_test_folder_only_and_elongated_images_stay_small(tmp_path):
    """daal-eval's folder needed (and checked) a train/ it never reads. A 100000 x 1 image (177
    bytes) was resized to 256 on its short side: 21 GB; the long side is cut to MAX_ASPECT times
    the short one first."""
    from PIL import Image

    from daal_triton.train.data.base import MAX_ASPECT

    root = str(tmp_path / "t")
    _split_tree(root)
    import shutil

    shutil.rmtree(os.path.join(root, "train"))
    strip = os.path.join(root, "test", "dog", "strip.png")
    Image.new("RGB", (100000, 1), (128, 0, 0)).save(strip)
    train, test = build_datasets("folder", root, 16, train=False)
    assert len(train) == 0 and len(test) == 5
    img, _ = test[test.paths.index(strip)]
    assert img.shape == (3, 16, 16)
    with pytest.raises(DatasetLayoutError, match="missing train/"):
        build_datasets("folder", root, 16)
    from daal_triton.train.data.base import LimitAspect

    assert isinstance(test.transform.transforms[0], LimitAspect)  # before the resize
    assert LimitAspect(MAX_ASPECT)(Image.new("RGB", (100000, 1))).size == (MAX_ASPECT, 1)
    assert LimitAspect(MAX_ASPECT)(Image.new("RGB", (3, 100))).size == (3, 3 * MAX_ASPECT)
    assert LimitAspect(MAX_ASPECT)(Image.new("RGB", (40, 30))).size == (40, 30)


def test_float_images_with_nan_or_inf_pixels_keep_their_picture():
    """A float image with one NaN or inf pixel was scaled by a NaN/inf range: all black."""
    from PIL import Image

    from daal_triton.train.data.base import to_rgb

    ramp = np.linspace(0, 1, 40 * 40, dtype=np.float32).reshape(40, 40)
    for bad in (np.nan, np.inf, -np.inf):
        a = ramp.copy()
        a[0, 0] = bad
        out = np.asarray(to_rgb(Image.fromarray(a)))
        assert out.max() == 255 and out[0, 0, 0] == 0 and 100 < out.mean() < 155, (bad, out.mean())


def test_the_fixed_class_counts_daal_train_checks_P_against_are_the_data_sets():
    """``-P`` is refused before any data is read where a data set's training classes are fixed
    (config.check_data_root): the table must say what the loaders give."""
    from daal_triton.train.data import MOST_TRAIN_CLASSES, build_datasets

    for name in ("shapes", "digits"):
        train, _ = build_datasets(name, image_size=32, shapes_train_per_class=1, shapes_test_per_class=1)
        assert train.num_classes == MOST_TRAIN_CLASSES[name], name
    assert set(MOST_TRAIN_CLASSES) == {"shapes", "digits", "cub200", "cars196"}
