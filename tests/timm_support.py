"""timm for the vision-tower parity tests, without torchvision.

transformers builds Gemma 3n's vision tower through timm (TimmWrapperModel). timm imports
one class from torchvision at import time (`torchvision.ops.misc.FrozenBatchNorm2d`), and the
torchvision wheel on PyPI is a CUDA build that fails to import beside the CPU torch the tests
use. timm.data imports more of it (datasets, transforms) that
MobileNet-V5 never uses. So when torchvision is absent, imports of it resolve to stand-in
modules (a working FrozenBatchNorm2d, placeholder classes for the rest), registered only in
the test process, before timm is imported. `need_timm()` returns the timm module, or
skips the test with the reason when timm is not installed (test.sh installs it).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import types

import pytest


class _AnyAttr(type):
    """A stand-in class whose every class attribute is another stand-in (timm reads constants
    such as InterpolationMode.BILINEAR at import time)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyAttr(f"{cls.__name__}.{name}", (), {})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyAttr(name, (), {})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of torchvision and its submodules resolve to stand-in modules."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StandInModule(spec.name)
        m.__path__ = []
        m.__edgelm_stand_in__ = True
        m.__file__ = __file__
        # a version from before transformers' torchvision image-processor defaults (0.27)
        m.__version__ = "0.26.0"
        if spec.name == "torchvision.ops.misc":
            m.FrozenBatchNorm2d = _frozen_batch_norm()
        return m

    def exec_module(self, module):
        pass


def _frozen_batch_norm():
    import torch

    class FrozenBatchNorm2d(torch.nn.Module):  # only isinstance checks reach it from MobileNet-V5
        def __init__(self, num_features: int, eps: float = 1e-5):
            super().__init__()
            for name, init in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                               ("running_var", torch.ones)):
                self.register_buffer(name, init(num_features))
            self.eps = eps

        def forward(self, x):
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            return x * scale[None, :, None, None] + shift[None, :, None, None]

    return FrozenBatchNorm2d


def need_timm():
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (test.sh installs it with --no-deps)")
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        sys.meta_path.append(_StandInFinder())  # last: only reached when no real torchvision exists
    import timm

    try:  # transformers builds TimmWrapperModel only when it sees timm and torchvision
        from transformers.utils import import_utils as iu

        for f in (iu.is_torchvision_available, iu.is_torchvision_v2_available, iu.is_timm_available):
            f.cache_clear()
        wrapper = sys.modules.get("transformers.models.timm_wrapper.modeling_timm_wrapper")
        if wrapper is not None:
            wrapper.timm = timm  # imported before timm was: its module-level `import timm` was skipped
    except ImportError:
        pass
    return timm
