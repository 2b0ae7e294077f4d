"""Datasets: IDX parsing with corruption checks, Fashion-MNIST, PNG folders, synthetic data, batch order."""
import gzip
import struct

import numpy as np
import pytest
import torch

from vaegan_fast import data


def write_idx(path, array: np.ndarray, compress=True):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return raw


def test_read_idx_round_trips(tmp_path):
    array = np.random.randint(0, 256, size=(5, 4, 3)).astype(np.uint8)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "a.idx", array, compress=False)
    assert np.array_equal(data.read_idx(tmp_path / "a.gz"), array)
    assert np.array_equal(data.read_idx(tmp_path / "a.idx"), array)


def test_truncated_or_corrupt_idx_files_are_rejected(tmp_path):
    raw = write_idx(tmp_path / "a.idx", np.ones((4, 3)), compress=False)
    (tmp_path / "short.idx").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(tmp_path / "short.idx")
    (tmp_path / "magic.idx").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "magic.idx")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(raw)[:-6])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        data.read_idx(tmp_path / "cut.gz")


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_fashion_mnist("train", root=tmp_path)


def test_fashion_mnist_files_of_the_wrong_shape_are_rejected(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((10, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros((10,)))
    with pytest.raises(ValueError, match="expected"):
        data.load_fashion_mnist("test", root=tmp_path)


@pytest.mark.skipif(not (data.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_test_split_loads_as_pixels_in_0_1():
    test = data.load_fashion_mnist("test")
    assert test.images.shape == (10000, 784) and test.images.dtype == torch.float32
    assert test.images.min() == 0 and test.images.max() == 1
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.image_shape == (1, 28, 28)


def save_png(path, array, mode=None):
    from PIL import Image
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)


def test_png_folder_of_grayscale_images_loads_with_its_shape(tmp_path):
    pixels = np.random.randint(0, 256, size=(3, 6, 5)).astype(np.uint8)
    for i, p in enumerate(pixels):
        save_png(tmp_path / f"{i}.png", p)
    folder = data.load_dataset(str(tmp_path))
    assert folder.image_shape == (1, 6, 5)
    torch.testing.assert_close(folder.images, torch.from_numpy(pixels.reshape(3, 30) / 255.0).float())


def test_png_folder_of_colour_images_loads_in_colour_channel_first(tmp_path):
    pixels = np.random.randint(0, 256, size=(4, 6, 5, 3)).astype(np.uint8)
    for i, p in enumerate(pixels):
        save_png(tmp_path / f"{i}.png", p)
    save_png(tmp_path / "4.png", np.dstack([pixels[0], np.full((6, 5), 128, np.uint8)]))  # RGBA: alpha dropped
    folder = data.load_dataset(str(tmp_path))
    assert folder.image_shape == (3, 6, 5) and folder.dim == 90
    want = torch.from_numpy(pixels.transpose(0, 3, 1, 2).reshape(4, 90) / 255.0).float()
    torch.testing.assert_close(folder.images[:4], want)
    torch.testing.assert_close(folder.images[4], want[0])


def test_a_folder_mixing_sizes_or_colour_names_a_file_of_each_kind(tmp_path):
    save_png(tmp_path / "a.png", np.zeros((6, 5)))
    save_png(tmp_path / "b.png", np.zeros((7, 5)))
    with pytest.raises(ValueError, match=r"a\.png is 5x6 and b\.png is 5x7.*--image-size"):
        data.load_image_folder(tmp_path)
    (tmp_path / "b.png").unlink()
    save_png(tmp_path / "c.png", np.zeros((6, 5, 3)))
    with pytest.raises(ValueError, match=r"grayscale images \(a\.png\) and colour images \(c\.png\).*--channels"):
        data.load_image_folder(tmp_path)
    (tmp_path / "d.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="d.png is not a readable PNG"):
        data.load_image_folder(tmp_path)


def test_channels_and_image_size_convert_a_mixed_folder(tmp_path):
    save_png(tmp_path / "a.png", np.full((6, 5), 200))
    save_png(tmp_path / "b.png", np.random.randint(0, 256, (9, 4, 3)))
    grey = data.load_image_folder(tmp_path, channels=1, image_size=(4, 4))
    assert grey.image_shape == (1, 4, 4) and grey.images.shape == (2, 16)
    torch.testing.assert_close(grey.images[0], torch.full((16,), 200 / 255))  # a flat image stays flat
    rgb = data.load_image_folder(tmp_path, channels=3, image_size=(4, 4))
    assert rgb.image_shape == (3, 4, 4)
    torch.testing.assert_close(rgb.images[0], torch.full((48,), 200 / 255))  # grey in three equal channels
    with pytest.raises(ValueError, match="channels must be 1"):
        data.load_image_folder(tmp_path, channels=2)
    with pytest.raises(ValueError, match="fixed shape"):
        data.load_dataset("synthetic", channels=3)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    save_png(tmp_path / "a.png", np.full((4, 4), 0), mode=None)
    from PIL import Image
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "b.png")
    folder = data.load_image_folder(tmp_path)
    assert folder.image_shape == (1, 4, 4)
    torch.testing.assert_close(folder.images[1], torch.full((16,), 32768 / 65535))


def test_synthetic_images_are_structured_and_in_range():
    synth = data.synthetic(64, seed=1)
    assert synth.images.shape == (64, 784)
    assert synth.images.min() >= 0 and synth.images.max() <= 1
    assert synth.images.std() > 0.05
    assert torch.equal(synth.images, data.synthetic(64, seed=1).images)
    with pytest.raises(ValueError, match="data must be one of"):
        data.load_dataset("cifar-10")


def test_batch_stream_is_a_function_of_the_step_and_covers_each_epoch_once():
    ds = data.ImageDataset(torch.arange(10.0).unsqueeze(1), (1, 1, 1))
    stream = data.BatchStream(ds, 3, seed=7)
    epoch0 = torch.cat([stream.batch(s) for s in range(3)]).flatten()
    assert len(set(epoch0.tolist())) == 9  # 3 full batches, the last partial one dropped
    again = data.BatchStream(ds, 3, seed=7)
    assert torch.equal(again.batch(4), stream.batch(4))  # a fresh stream (a resumed run) agrees
    assert not torch.equal(stream.batch(0), stream.batch(3))  # a new epoch is a new permutation
    with pytest.raises(ValueError, match="larger than the dataset"):
        data.BatchStream(ds, 11)


def test_a_dataset_carries_an_image_shape_that_fits_its_rows():
    rows = torch.rand(4, 2 * 3 * 5)
    assert data.ImageDataset(rows, [2, 3, 5]).image_shape == (2, 3, 5)
    with pytest.raises(ValueError, match=r"image_shape must be \(channels, height, width\)"):
        data.ImageDataset(rows, (3, 10))  # the 2-d shape two evaluate tests once passed
    with pytest.raises(ValueError, match=r"images must be \[N, 30\] rows of 2x3x5 images, got \[4, 29\]"):
        data.ImageDataset(torch.rand(4, 29), (2, 3, 5))
