"""The fused ops with the backend bound, and the awkward shapes every backend is tested on."""
import vaegan_fast.ops as ops

# One row, one column, primes, non-multiples of every block size, and a large one.
SHAPES = [(1, 1), (1, 37), (41, 1), (3, 5), (257, 129), (1000, 784), (2048, 1024)]


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def reparam(backend):
    return lambda mu, lv, eps: ops.reparam_kl(mu, lv, eps, backend=backend)


def disc(backend):
    return lambda *xs: ops.discriminator_loss(*xs, backend=backend)


def gen(backend, saturating):
    return lambda *xs: ops.generator_loss(*xs, saturating=saturating, backend=backend)


def recon(backend):
    return lambda a, b: ops.feature_recon_loss(a, b, backend=backend)
