"""On a GPU: what only a device can show, beyond the op tests that run there unchanged (tests/test_triton_*.py)
and the CUDA-graph replays (tests/test_cuda_graphs.py). bench/gpu_check.sh runs this file; on a CPU it is
skipped.

- the conv presets on the triton backend train as the fp64 reference (step by step, tests/stepcheck.py);
- bf16 and fp16 training on the device: finite losses, fp32 master weights, fp16's loss scale on the device;
- NCCL: a data-parallel model in a world of one process trains exactly as the plain model.
"""
import pytest
import torch
import torch.distributed as dist

from stepcheck import check_training_follows_reference
from vaegan_fast import Model
from vaegan_fast.distributed import shutdown

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONV = {"conv": dict(image_shape=(1, 8, 8), latent_dim=3),
        "larsen64": dict(image_shape=(3, 8, 8), latent_dim=4)}
SIZES = dict(input_dim=20, latent_dim=3, encoder_hidden=(12, 7), decoder_hidden=(7, 12),
             discriminator_hidden=(11, 6))


@pytest.fixture
def no_tf32(monkeypatch):
    # cuDNN convolutions may use TF32 by default (torch.backends.cudnn.allow_tf32); the fp64 comparison below
    # checks the math, so the convolutions run in true fp32 here.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.parametrize("preset", CONV)
def test_conv_presets_on_triton_follow_the_reference(preset, monkeypatch, no_tf32):
    model = Model.preset(preset, **CONV[preset], backend="triton", seed=5).to("cuda")
    gen = torch.Generator().manual_seed(1)
    batches = [torch.rand(6, *CONV[preset]["image_shape"], generator=gen).cuda() for _ in range(3)]
    check_training_follows_reference(model, batches, monkeypatch)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("preset", ["seed", "conv"])
def test_low_precision_trains_on_the_device(preset, precision):
    model = Model.preset(preset, precision=precision, backend="auto", check_inputs=False, seed=2).to("cuda")
    gen = torch.Generator().manual_seed(3)
    shape = model.input_shape
    for _ in range(6):
        stats = model.train_step(torch.rand(32, *shape, generator=gen).cuda())
        for key in ("encoder_loss", "decoder_loss", "discriminator_loss"):
            assert torch.isfinite(stats[key]).all(), (key, stats[key])
    assert model.step == 6
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.is_cuda, name  # fp32 master weights on the device
        assert torch.isfinite(p).all(), name
    if precision == "fp16":
        assert model.loss_scaler.scale.is_cuda


def test_nccl_world_of_one_trains_as_one_process(tmp_path):
    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    gen = torch.Generator().manual_seed(4)
    batches = [torch.rand(8, 20, generator=gen).cuda() for _ in range(4)]
    single = Model(**SIZES, seed=1).cuda()
    want = [single.train_step(x) for x in batches]
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = Model(**SIZES, seed=1).cuda().enable_data_parallel()
        got = [model.train_step(x) for x in batches]
        assert dist.get_backend() == "nccl"
    finally:
        shutdown()
    for a, b in zip(want, got):
        for key in a:
            torch.testing.assert_close(b[key], a[key], msg=key)
    for (name, a), b in zip(single.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)
