"""Tests for stmae.data on tiny fixtures generated in tmp_path (plus optional real-data checks)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stmae.data import (
    IMAGE_EXTENSIONS,
    ONECLASS_PROTOCOLS,
    AnomalyDataset,
    DataError,
    Sample,
    list_images,
    load_btad,
    load_folder,
    load_mvtec,
    load_oneclass,
    load_visa,
    open_dataset,
    read_image,
    read_mask,
    resize_image,
    resize_mask,
    to_tensor_batch,
)
from stmae.data.io import as_rgb

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FASHION_NAMES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
)  # fmt: skip


# --------------------------------------------------------------------------- helpers


def save(path: Path, array: np.ndarray, mode: str | None = None, **kw) -> Path:
    """Write ``array`` as an image (format from the suffix), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array) if mode is None else Image.fromarray(array, mode=mode)
    img.save(path, **kw)
    return path


def gray(h: int = 6, w: int = 8, value: int = 100) -> np.ndarray:
    return np.full((h, w), value, dtype=np.uint8)


def mask_arr(h: int = 6, w: int = 8) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[1:3, 2:5] = 255
    return m


def make_mvtec(root: Path, *, masks: bool = True, test: bool = True) -> Path:
    """train/good x3, test/good x2, test/crack x2, test/hole x1 (+ masks)."""
    cat = root / "widget"
    for i in range(3):
        save(cat / "train" / "good" / f"{i:03d}.png", gray(value=10 * i))
    if test:
        for i in range(2):
            save(cat / "test" / "good" / f"{i:03d}.png", gray())
        for defect, n in (("crack", 2), ("hole", 1)):
            for i in range(n):
                save(cat / "test" / defect / f"{i:03d}.png", gray(value=200))
                if masks:
                    save(cat / "ground_truth" / defect / f"{i:03d}_mask.png", mask_arr())
    return cat


def make_btad(root: Path) -> Path:
    cat = root / "03"
    for i in range(2):
        save(cat / "train" / "ok" / f"{i:04d}.bmp", gray())
    save(cat / "test" / "ok" / "0000.bmp", gray())
    save(cat / "test" / "ko" / "0000.bmp", gray(value=5))
    save(cat / "test" / "ko" / "0001.png", gray(value=5))
    save(cat / "ground_truth" / "ko" / "0000.bmp", mask_arr())  # product 03 style
    save(cat / "ground_truth" / "ko" / "0001.png", mask_arr())  # products 01/02 style
    return cat


def write_idx(path: Path, array: np.ndarray, magic: int, *, compress: bool = True) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def make_idx_folder(root: Path, *, n_train: int = 40, n_test: int = 30, compress: bool = True) -> Path:
    """MNIST-format files; image i is filled with value i % 256 and has label i % 10."""
    sfx = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.repeat((np.arange(n) % 256).astype(np.uint8)[:, None, None], 28 * 28, axis=1).reshape(n, 28, 28)
        write_idx(root / f"{prefix}-images-idx3-ubyte{sfx}", images, 2051, compress=compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{sfx}", np.arange(n) % 10, 2049, compress=compress)
    return root


# --------------------------------------------------------------------------- io


def test_read_image_grayscale_becomes_rgb(tmp_path):
    img = read_image(save(tmp_path / "g.png", gray(4, 5, 77)))
    assert img.dtype == np.uint8 and img.shape == (4, 5, 3)
    assert (img == 77).all()
    rgb = read_image(save(tmp_path / "rgb.png", np.zeros((4, 5, 3), np.uint8)))
    rgb[0, 0] = 1  # callers may modify what they get


def test_read_image_la_and_rgba_drop_alpha(tmp_path):
    la = np.stack([gray(3, 3, 90), gray(3, 3, 0)], axis=2)
    assert (read_image(save(tmp_path / "la.png", la, mode="LA")) == 90).all()
    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0  # fully transparent
    out = read_image(save(tmp_path / "rgba.png", rgba, mode="RGBA"))
    assert out.shape == (3, 3, 3) and out[0, 0].tolist() == [10, 20, 30]


def test_read_image_palette_and_cmyk(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png")[0].tolist() == [[0, 0, 0], [255, 0, 0]]
    Image.new("CMYK", (2, 2), (0, 255, 0, 0)).save(tmp_path / "c.jpg", quality=100)
    c = read_image(tmp_path / "c.jpg")
    assert c.shape == (2, 2, 3) and c[0, 0, 1] < 20 and c[0, 0, 0] > 235


def test_read_image_16bit_uses_full_range(tmp_path):
    arr = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    path = save(tmp_path / "16.png", arr)
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I")
    assert read_image(path)[0, :, 0].tolist() == [0, 1, 255, 128]
    # Masks from 16-bit files are thresholded at > 0 on the raw values.
    assert read_mask(path).tolist() == [[False, True, True, True]]


def test_read_image_applies_exif_orientation(tmp_path):
    arr = np.zeros((2, 3, 3), np.uint8)
    arr[0, 0] = [255, 0, 0]  # red top-left in storage order, 3 wide x 2 high
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored image rotated 90 degrees clockwise
    path = save(tmp_path / "rot.png", arr, exif=exif)
    out = read_image(path)
    assert out.shape == (3, 2, 3)
    assert out[0, 1].tolist() == [255, 0, 0] and out[0, 0].tolist() == [0, 0, 0]
    # The mask check uses the oriented size, so an upright 2x3 mask matches.
    save(tmp_path / "rot_mask.png", np.zeros((3, 2), np.uint8))
    sample = Sample(path=path, label=1, defect_type="x", mask_path=tmp_path / "rot_mask.png")
    assert sample.load_mask().shape == (3, 2)


def test_as_rgb_accepts_pil_and_arrays():
    assert as_rgb(Image.new("L", (3, 2), 9)).shape == (2, 3, 3)
    assert as_rgb(np.full((2, 2), 65535, np.uint16)).max() == 255
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 2] = 7
    assert as_rgb(rgba)[0, 0].tolist() == [0, 0, 7]
    assert as_rgb(np.full((2, 2, 3), 0.5, np.float32))[0, 0].tolist() == [128, 128, 128]
    rgb = np.zeros((2, 2, 3), np.uint8)
    assert np.shares_memory(as_rgb(rgb), rgb)  # no needless copy
    with pytest.raises(DataError, match="int64"):
        as_rgb(np.zeros((2, 2), np.int64))


@pytest.mark.parametrize(
    ("array", "mode"),
    [
        (np.array([[0, 255, 0]], np.uint8), None),  # 0/255
        (np.array([[0, 1, 0]], np.uint8), None),  # 0/1 (VisA)
        (np.array([[[0, 0, 0], [0, 0, 1], [0, 0, 0]]], np.uint8), None),  # dark colour
        (np.array([[[0, 0, 0, 255], [9, 0, 0, 255], [0, 0, 0, 0]]], np.uint8), "RGBA"),
    ],
)
def test_read_mask_binarises_any_nonzero(tmp_path, array, mode):
    m = read_mask(save(tmp_path / "m.png", array, mode=mode))
    assert m.dtype == bool and m.tolist() == [[False, True, False]]


def test_read_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="broken.png"):
        read_image(bad)
    truncated = tmp_path / "trunc.png"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    good_bytes = save(tmp_path / "ok.png", noise).read_bytes()
    truncated.write_bytes(good_bytes[: len(good_bytes) // 2])
    with pytest.raises(DataError, match="trunc.png"):
        read_mask(truncated)
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "missing.png")


def test_list_images_filters_sorts_and_recurses(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.JpEg", ".hidden.png", "._a.jpg", "notes.txt", "d.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.tif").write_bytes(b"x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "f.png").write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.JpEg", "d.webp"]
    assert [p.name for p in list_images(tmp_path, recursive=True)] == ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "e.tif"]
    assert ".png" in IMAGE_EXTENSIONS and ".bmp" in IMAGE_EXTENSIONS
    with pytest.raises(DataError, match="nope"):
        list_images(tmp_path / "nope")


# --------------------------------------------------------------------------- transforms


def test_resize_image_and_mask():
    img = np.full((10, 20, 3), 123, np.uint8)
    out = resize_image(img, 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8 and (out == 123).all()
    assert resize_image(img, (4, 6)).shape == (4, 6, 3)
    mask = np.zeros((10, 20), bool)
    mask[:, :10] = True
    small = resize_mask(mask, (5, 4))
    assert small.dtype == bool and small.shape == (5, 4)
    assert small[:, :2].all() and not small[:, 2:].any()


def test_to_tensor_batch():
    a = np.zeros((4, 5, 3), np.uint8)
    b = np.full((4, 5, 3), 255, np.uint8)
    b[0, 0] = [255, 0, 51]
    t = to_tensor_batch([a, b])
    assert t.shape == (2, 3, 4, 5) and t.dtype == torch.float32
    assert t.min() == 0 and t.max() == 1
    assert torch.allclose(t[1, :, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    with pytest.raises(ValueError, match="resize"):
        to_tensor_batch([a, np.zeros((5, 5, 3), np.uint8)])


# --------------------------------------------------------------------------- MVTec


def test_mvtec_happy_path(tmp_path):
    ds = load_mvtec(make_mvtec(tmp_path))
    assert isinstance(ds, AnomalyDataset) and ds.name == "widget"
    assert len(ds.train) == 3 and all(s.label == 0 and s.defect_type == "good" for s in ds.train)
    assert len(ds.test) == 5 and sum(s.label for s in ds.test) == 3
    assert ds.defect_types() == ["crack", "hole"] and ds.has_masks and ds.skipped == []
    bad = [s for s in ds.test if s.label == 1]
    assert [s.name for s in bad] == ["crack/000.png", "crack/001.png", "hole/000.png"]
    for s in bad:
        mask = s.load_mask()
        assert mask.dtype == bool and mask.shape == s.load_image().shape[:2] and mask.sum() == 6
    assert all(s.load_mask() is None for s in ds.test if s.label == 0)


def test_mvtec_train_only_and_without_ground_truth(tmp_path):
    train_only = load_mvtec(make_mvtec(tmp_path / "a", test=False))
    assert len(train_only.train) == 3 and train_only.test == [] and not train_only.has_masks
    no_gt = make_mvtec(tmp_path / "b", masks=False)
    ds = load_mvtec(no_gt)
    assert not ds.has_masks and all(s.mask_path is None for s in ds.test)
    expected = r"does not exist.*\n.*crack/000.png -> expected .*ground_truth/crack/000_mask.png"
    with pytest.raises(DataError, match=expected):
        load_mvtec(no_gt, require_masks=True)


def test_mvtec_defect_without_mask(tmp_path):
    cat = make_mvtec(tmp_path)
    (cat / "ground_truth" / "hole" / "000_mask.png").unlink()
    expected = r"1 defect images have no mask.*\n.*hole/000.png -> expected .*hole/000_mask.png"
    with pytest.raises(DataError, match=expected):
        load_mvtec(cat)
    ds = load_mvtec(cat, require_masks=False)
    assert not ds.has_masks and len(ds.test) == 5


def test_mvtec_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match=r"nowhere does not exist.*\n.*train/good"):
        load_mvtec(tmp_path / "nowhere")
    (tmp_path / "cat" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"Training folder .*train/good does not exist"):
        load_mvtec(tmp_path / "cat")
    (tmp_path / "cat" / "train" / "good").mkdir()
    (tmp_path / "cat" / "train" / "good" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="contains no images"):
        load_mvtec(tmp_path / "cat")


def test_mvtec_corrupt_file_verify_and_skip(tmp_path):
    cat = make_mvtec(tmp_path)
    (cat / "train" / "good" / "001.png").write_bytes(b"\x89PNG garbage")
    (cat / "ground_truth" / "crack" / "001_mask.png").write_bytes(b"junk")
    assert len(load_mvtec(cat).train) == 3  # not decoded without verify
    with pytest.raises(DataError, match="001.png"):
        load_mvtec(cat, verify=True)
    ds = load_mvtec(cat, skip_unreadable=True)
    assert len(ds.train) == 2 and len(ds.test) == 4
    assert sorted(Path(f).name for f, _ in ds.skipped) == ["001.png", "001_mask.png"]
    with pytest.raises(DataError, match="001.png"):
        Sample(path=cat / "train" / "good" / "001.png", label=0, defect_type="good").load_image()


def test_mask_size_mismatch_names_both_files(tmp_path):
    cat = make_mvtec(tmp_path)
    save(cat / "ground_truth" / "hole" / "000_mask.png", mask_arr(5, 8))
    sample = next(s for s in load_mvtec(cat).test if s.defect_type == "hole")
    with pytest.raises(DataError, match=r"000_mask.png is 8x5 .* image .*hole/000.png is 8x6"):
        sample.load_mask()


# --------------------------------------------------------------------------- BTAD, VisA, folder


def test_btad_png_and_bmp_masks(tmp_path):
    ds = load_btad(make_btad(tmp_path))
    assert ds.name == "03" and len(ds.train) == 2 and len(ds.test) == 3
    assert ds.defect_types() == ["ko"] and ds.has_masks
    assert {s.defect_type for s in ds.test if s.label == 0} == {"good"}
    for s in ds.test:
        if s.label:
            assert s.load_mask().shape == (6, 8)


def test_btad_missing_mask(tmp_path):
    cat = make_btad(tmp_path)
    (cat / "ground_truth" / "ko" / "0001.png").unlink()
    with pytest.raises(DataError, match=r"ko/0001.png -> expected .*ground_truth/ko/0001.png"):
        load_btad(cat)


def make_visa(root: Path) -> Path:
    data = root / "candle" / "Data"
    save(data / "Images" / "Normal" / "0000.JPG", np.zeros((6, 8, 3), np.uint8))
    save(data / "Images" / "Normal" / "0001.JPG", np.zeros((6, 8, 3), np.uint8))
    save(data / "Images" / "Normal" / "0002.JPG", np.zeros((6, 8, 3), np.uint8))
    save(data / "Images" / "Anomaly" / "000.JPG", np.zeros((6, 8, 3), np.uint8))
    save(data / "Masks" / "Anomaly" / "000.png", (mask_arr() > 0).astype(np.uint8))  # 0/1 mask
    rows = [
        "object,split,label,image,mask",
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
        "candle,train,normal,candle/Data/Images/Normal/0001.JPG,",
        "candle,test,normal,candle/Data/Images/Normal/0002.JPG,",
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png",
        "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,",
    ]
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    return root


def test_visa_happy_path(tmp_path):
    ds = load_visa(make_visa(tmp_path), "candle")
    assert (len(ds.train), len(ds.test)) == (2, 2) and ds.has_masks
    bad = next(s for s in ds.test if s.label)
    assert bad.defect_type == "anomaly" and bad.name == "Anomaly/000.JPG"
    assert bad.load_mask().sum() == 6
    assert len(open_dataset(tmp_path, category="candle").train) == 2


def test_visa_errors(tmp_path):
    root = make_visa(tmp_path)
    with pytest.raises(DataError, match="available: candle, pcb1"):
        load_visa(root, "cable")
    with pytest.raises(DataError, match="does not exist"):
        load_visa(root, "pcb1")  # its image file is absent
    (root / "candle" / "Data" / "Masks" / "Anomaly" / "000.png").unlink()
    with pytest.raises(DataError, match=r"Anomaly/000.JPG: mask .*000.png does not exist"):
        load_visa(root, "candle")
    with pytest.raises(DataError, match="split_csv"):
        load_visa(tmp_path / "candle", "candle")
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.write_text(csv_path.read_text(encoding="utf-8-sig").replace("anomaly", "defect"), encoding="utf-8")
    with pytest.raises(DataError, match=r"1cls.csv, line 5: label 'defect' is not one of"):
        load_visa(root, "candle")


def test_folder_loader(tmp_path):
    for i in range(3):
        save(tmp_path / "ok" / f"{i}.png", gray())
    save(tmp_path / "ok_test" / "n.png", gray())
    save(tmp_path / "scratch" / "a.png", gray())
    save(tmp_path / "scratch" / "b.jpg", np.zeros((6, 8, 3), np.uint8))
    save(tmp_path / "masks" / "a.png", mask_arr())
    save(tmp_path / "masks" / "b_mask.png", mask_arr())
    ds = load_folder(tmp_path / "ok", tmp_path / "scratch", tmp_path / "masks", test_good_dir=tmp_path / "ok_test")
    assert (len(ds.train), len(ds.test)) == (3, 3) and ds.has_masks and ds.defect_types() == ["scratch"]
    assert [s.mask_path.name for s in ds.test if s.label] == ["a.png", "b_mask.png"]
    no_masks = load_folder(tmp_path / "ok", tmp_path / "scratch")
    assert not no_masks.has_masks and len(no_masks.test) == 2
    (tmp_path / "masks" / "b_mask.png").unlink()
    with pytest.raises(DataError, match=r"b.jpg -> expected .*masks/b.png"):
        load_folder(tmp_path / "ok", tmp_path / "scratch", tmp_path / "masks")


def test_open_dataset_detects_layouts(tmp_path):
    assert open_dataset(make_mvtec(tmp_path / "m")).has_masks
    assert open_dataset(make_btad(tmp_path / "b")).defect_types() == ["ko"]
    save(tmp_path / "plain" / "x.png", gray())
    plain = open_dataset(tmp_path / "plain")
    assert (len(plain.train), plain.test) == (1, [])
    with pytest.raises(DataError, match=r"contains dataset categories \(widget\)"):
        open_dataset(tmp_path / "m")
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "missing")


# --------------------------------------------------------------------------- one-class protocols


def test_oneclass_fashion_mnist_idx(tmp_path):
    root = make_idx_folder(tmp_path)
    ds = load_oneclass("fashion-mnist", root, 3)
    assert ds.name == "fashion_mnist-Dress" and not ds.has_masks
    assert len(ds.train) == 4 and all(s.label == 0 and s.path is None for s in ds.train)
    assert len(ds.test) == 30 and sum(s.label == 0 for s in ds.test) == 3
    s17 = ds.test[17]
    assert s17.name == "fashion_mnist/test/00017" and s17.defect_type == FASHION_NAMES[7] and s17.label == 1
    img = s17.load_image()
    assert img.shape == (28, 28, 3) and (img == 17).all()
    img[:] = 0  # callers get a copy; the dataset is unaffected
    assert (ds.test[17].load_image() == 17).all() and ds.test[17].load_mask() is None
    assert set(ds.defect_types()) == set(FASHION_NAMES) - {"Dress"}
    by_name = load_oneclass("fashion-mnist", root, "dress", train_limit=2, seed=1)
    assert len(by_name.train) == 2 and {s.name for s in by_name.train} <= {s.name for s in ds.train}
    assert [s.name for s in load_oneclass("fashion-mnist", root, "Dress", train_limit=2, seed=1).train] == [
        s.name for s in by_name.train
    ]
    assert len(load_oneclass("fashion-mnist", root, 3, test_limit=7).test) == 7


def test_oneclass_validation_split_never_touches_test(tmp_path):
    root = make_idx_folder(tmp_path)
    ds = load_oneclass("fashion-mnist", root, 3, train_limit=2, seed=1, validation=10)
    assert ds.name == "fashion_mnist-Dress-validation"
    assert len(ds.test) == 10 and all(s.name.startswith("fashion_mnist/train/") for s in ds.test)
    assert not {s.name for s in ds.test} & {s.name for s in ds.train}
    assert {s.label for s in ds.test if s.defect_type == "Dress"} <= {0}
    everything = load_oneclass("fashion-mnist", root, 3, train_limit=2, seed=1, validation=10_000)
    assert len(everything.test) == 40 - 2  # every unused training image


def test_oneclass_invalid_class_and_protocol(tmp_path):
    root = make_idx_folder(tmp_path)
    with pytest.raises(DataError, match="0=T-shirt_top, 1=Trouser"):
        load_oneclass("fashion-mnist", root, "jacket")
    with pytest.raises(DataError, match="valid classes"):
        load_oneclass("fashion-mnist", root, 10)
    with pytest.raises(DataError, match="fashion-mnist, mnist, cifar10, folder"):
        load_oneclass("svhn", root, 0)
    assert ONECLASS_PROTOCOLS == ("fashion-mnist", "mnist", "cifar10", "folder")


def test_oneclass_bad_idx_files(tmp_path):
    root = make_idx_folder(tmp_path)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(30), 2051)  # wrong magic
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: IDX magic number is 2051, expected 2049"):
        load_oneclass("fashion-mnist", root, 0)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(29), 2049)  # count mismatch
    with pytest.raises(DataError, match="30 images but 29 labels"):
        load_oneclass("fashion-mnist", root, 0)
    payload = gzip.decompress((root / "train-images-idx3-ubyte.gz").read_bytes())
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(payload[:-5]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: header promises"):
        load_oneclass("fashion-mnist", root, 0)
    (root / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="expected train-images-idx3-ubyte"):
        load_oneclass("fashion-mnist", root, 0)


def test_oneclass_mnist_idx_and_csv(tmp_path):
    idx = load_oneclass("mnist", make_idx_folder(tmp_path / "idx", compress=False), "7")
    assert idx.name == "mnist-7" and len(idx.train) == 4 and idx.defect_types()[0] == "0"
    rows = np.zeros((100, 785), np.int64)
    rows[:, -1] = np.repeat(np.arange(10), 10)
    rows[:, 0] = np.arange(100)  # identify rows by their first pixel
    csv = tmp_path / "mnist_5k.csv.gz"
    csv.write_bytes(gzip.compress("\n".join(",".join(map(str, r)) for r in rows).encode()))
    ds = load_oneclass("mnist", csv, 2, seed=0)
    assert len(ds.train) == 8 and len(ds.test) == 20 and sum(s.label == 0 for s in ds.test) == 2
    train_ids = {int(s.load_image()[0, 0, 0]) for s in ds.train}
    assert train_ids < set(range(20, 30))
    assert {s.name for s in load_oneclass("mnist", tmp_path, 2, seed=0).test} == {s.name for s in ds.test}
    other = load_oneclass("mnist", csv, 2, seed=1)
    assert {int(s.load_image()[0, 0, 0]) for s in other.train} != train_ids
    csv.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    with pytest.raises(DataError, match="mnist_5k.csv.gz.*785"):
        load_oneclass("mnist", csv, 2)


def test_oneclass_cifar10(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(range(10))}
        (base / name).write_bytes(pickle.dumps(batch, protocol=5 if name == "test_batch" else 2))
    first = pickle.loads((base / "test_batch").read_bytes())[b"data"][0]
    ds = load_oneclass("cifar10", tmp_path, "cat")
    assert len(ds.train) == 5 and len(ds.test) == 10 and ds.test[0].defect_type == "airplane"
    img = ds.test[0].load_image()
    assert img.shape == (32, 32, 3) and img[0, 0].tolist() == [first[0], first[1024], first[2048]]
    (base / "data_batch_3").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(DataError, match=r"data_batch_3.*builtins.print is not allowed"):
        load_oneclass("cifar10", base, 0)  # the restricted unpickler never calls print


class _Evil:
    """Pickles to a call of print(): must be refused by the CIFAR reader."""

    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_oneclass_folder_protocol(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(5):
            save(tmp_path / "flat" / cls / f"{i}.png", gray(value=i))
            save(tmp_path / "split" / ("train" if i < 3 else "test") / cls / f"{i}.png", gray())
    flat = load_oneclass("folder", tmp_path / "flat", "dog")
    assert (len(flat.train), len(flat.test)) == (4, 2) and flat.defect_types() == ["cat"]
    assert flat.train[0].path is not None and flat.train[0].load_image().shape == (6, 8, 3)
    assert [s.name for s in flat.train] == [s.name for s in load_oneclass("folder", tmp_path / "flat", 1).train]
    split = load_oneclass("folder", tmp_path / "split", 0)
    assert (len(split.train), len(split.test)) == (3, 4)
    assert split.test[0].name == "split/test/cat/3.png"


# --------------------------------------------------------------------------- real data (optional)


MAGNETIC_TILE = SHARED_DATA / "magnetic_tile" / "magnetic_tile"


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="shared magnetic_tile data absent")
def test_real_magnetic_tile():
    ds = open_dataset(MAGNETIC_TILE)
    assert (len(ds.train), len(ds.test)) == (762, 582)
    assert len(ds.defect_types()) == 5 and ds.has_masks
    sample = next(s for s in ds.test if s.defect_type == "crack")
    assert sample.load_mask().shape == sample.load_image().shape[:2]


@pytest.mark.skipif(not (SHARED_DATA / "fashion_mnist").is_dir(), reason="shared fashion_mnist data absent")
def test_real_fashion_mnist():
    ds = load_oneclass("fashion-mnist", SHARED_DATA / "fashion_mnist", 0, train_limit=100)
    assert len(ds.train) == 100 and len(ds.test) == 10000
    assert sum(s.label == 0 for s in ds.test) == 1000


def test_large_jpeg_decodes_at_a_reduced_scale_never_below_the_model_size(tmp_path):
    """JPEG draft decoding: a 1024 x 768 frame for a 256-px model decodes at 1/2 scale (both
    sides still >= 256) and, once resized, matches the full decode; small JPEGs and PNGs are untouched."""
    from stmae.data import decode_image_bytes, read_image, resize_image

    yy, xx = np.mgrid[0:768, 0:1024]
    img = np.stack([(xx / 4) % 256, (yy / 3) % 256, ((xx + yy) / 7) % 256], axis=2).astype(np.uint8)
    big = tmp_path / "big.jpg"
    Image.fromarray(img).save(big, quality=95)
    full = read_image(big)
    reduced = read_image(big, reduce_to=256)
    assert full.shape == (768, 1024, 3)
    assert reduced.shape == (384, 512, 3)  # scale 2: 768 // 256 = 3 rounds down to the DCT scale 2
    assert read_image(big, reduce_to=96).shape == (96, 128, 3)  # scale 8 at most
    diff = np.abs(resize_image(full, 256).astype(int) - resize_image(reduced, 256).astype(int))
    assert diff.mean() < 2.0 and np.percentile(diff, 99) < 12
    assert decode_image_bytes(big.read_bytes(), "big.jpg", reduce_to=256).shape == (384, 512, 3)
    assert read_image(big, reduce_to=400).shape == (768, 1024, 3)  # 768 < 2 x 400: full decode
    png = tmp_path / "big.png"
    Image.fromarray(img).save(png)
    assert read_image(png, reduce_to=256).shape == (768, 1024, 3)
