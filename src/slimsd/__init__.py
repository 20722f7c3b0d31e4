"""slimsd: distilled Stable Diffusion. Compress a U-Net by block removal, distill it from its teacher, run it."""

from slimsd.models.presets import PRESETS, RECIPES, get_preset
from slimsd.version import __version__


def compress(*args, **kwargs):
    """See :func:`slimsd.models.compress.compress`."""
    from slimsd.models.compress import compress as _compress

    return _compress(*args, **kwargs)


def load(*args, **kwargs):
    """The one way to a pipeline: a preset, offline model, local folder or hub id on a device, in a dtype, with
    the fast runtime unless ``optimize=False``. See :func:`slimsd.models.loading.load`."""
    from slimsd.models.loading import load as _load

    return _load(*args, **kwargs)


__all__ = ["PRESETS", "RECIPES", "__version__", "compress", "get_preset", "load"]
