"""A second device on a CPU-only machine: CI catches device mistakes that only a GPU would show.

Every tensor counts as living on the model's device except "host" tensors, which carry a mark:
those that library or test code makes with a tensor factory or copies with `.cpu()`/`.to(device)`
(including `explorer.core.runtime.to_host`), and whatever is computed from host tensors alone.
`explorer.core.runtime.to_model` removes the mark, as do torch and transformers when they move an
input to the device they compute on. An op that mixes a host tensor with a tensor on the model's
side raises DeviceGuardError as CUDA would (0-dim host scalars and host index tensors are allowed,
as on CUDA); so do a tensor factory called from explorer/ without `device=`, and `.numpy()` of a
tensor on the model's side. While the guard is on, explorer's and the tests' modules see a `torch`
whose factories are wrapped, and Tensor.to/.cpu/.numpy are wrapped (a torch function mode would
see all of it too, but doubles the cost of every op). See README.md, "Running on a GPU or Apple
silicon".
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import sys
import types
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves, tree_map

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = str(ROOT / "explorer") + os.sep
TESTS = str(ROOT / "tests") + os.sep
# Trains the demo model on the CPU by design (fixed weights); it never sees a user's device.
EXEMPT = (str(ROOT / "explorer" / "sources" / "demo" / "train.py"),)
_SKIPPED = (os.path.dirname(torch.__file__) + os.sep, __file__)

FACTORIES = ("tensor", "as_tensor", "asarray", "zeros", "ones", "full", "empty", "empty_strided", "arange",
             "linspace", "logspace", "eye", "rand", "randn", "randint", "randperm", "scalar_tensor", "tril_indices",
             "triu_indices")
INDEXING = ("__getitem__", "__setitem__", "index_put_", "index_put")

ACTIVE = False  # the marks stay on cached tensors; with the guard off they change nothing
_ORIGINALS: dict = {}  # (owner, name) -> what was there before the guard, while it is installed
_depth = 0


class DeviceGuardError(RuntimeError):
    """What CUDA would have raised (or what the design rules forbid), caught on the CPU."""


def _caller():
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame = frame.f_back
    return frame


def _origin(frame) -> str | None:
    """'library', 'tests' or None (torch, transformers, nnsight, ...) for the code that made a call."""
    name = frame.f_code.co_filename if frame is not None else ""
    if name.startswith(EXEMPT):
        return None
    if name.startswith(LIBRARY):
        return "library"
    return "tests" if name.startswith(TESTS) else None


def _is_to_model(frame) -> bool:
    from explorer.core import runtime
    return frame is not None and frame.f_code is runtime.to_model.__code__


def _where(frame) -> str:
    """file:line of the nearest library or test code at or above `frame` (where to fix it)."""
    while frame is not None and not _origin(frame):
        frame = frame.f_back
    return f"{os.path.relpath(frame.f_code.co_filename, ROOT)}:{frame.f_lineno}" if frame is not None else "?"


def _names_device(name: str, args, kwargs) -> bool:
    if name == "cpu" or kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args)


def mark_host(x):
    """Mark the tensors in x as host tensors (an emulated CPU beside the model's device)."""
    return tree_map(lambda t: t.as_subclass(HostTensor) if type(t) is torch.Tensor else t, x)


def _unmark(x):
    return tree_map(lambda t: t.as_subclass(torch.Tensor) if isinstance(t, HostTensor) else t, x)


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


class HostTensor(torch.Tensor):
    """A CPU tensor seen from a model that lives elsewhere."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if not ACTIVE:
                return func(*args, **kwargs)
            name = _name(func)
            if name in ("to", "cpu") and _names_device(name, args[1:], kwargs):
                out = func(*args, **kwargs)
                # to_model moves to the model's device; torch or transformers moving an input to
                # the device it computes on does too. A move made anywhere else stays on the host.
                frame = _caller()
                moved = name == "to" and (_is_to_model(frame) or _origin(frame) is None)
                return _unmark(out) if moved else mark_host(out)
            _check(func, args, kwargs)
            out = func(*args, **kwargs)
            model_side = [t for t in tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor) and not isinstance(t, HostTensor) and t.dim() > 0]
            return out if model_side else mark_host(out)


def _check(func, args, kwargs) -> None:
    if _name(func) in INDEXING:  # a CPU index may select from a tensor on the device; values must match it
        indexed = args[0]
        values = [args[2]] if _name(func) == "__setitem__" else list(args[2:3]) + list(kwargs.values())
        values = [v for v in tree_leaves(values) if isinstance(v, torch.Tensor)]
        if isinstance(indexed, HostTensor):
            if any(not isinstance(t, HostTensor) and t.dim() > 0
                   for t in tree_leaves((args[1], values)) if isinstance(t, torch.Tensor)):
                _raise(func, "indexes or fills a host tensor with a tensor on the model's device")
        elif any(isinstance(v, HostTensor) and v.dim() > 0 for v in values):
            _raise(func, "writes a host tensor into a tensor on the model's device")
        return
    leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if any(isinstance(t, HostTensor) and t.dim() > 0 for t in leaves) and \
            any(not isinstance(t, HostTensor) and t.dim() > 0 for t in leaves):
        _raise(func, "mixes a host tensor with a tensor on the model's device")


def _raise(func, what: str):
    raise DeviceGuardError(
        f"Expected all tensors to be on the same device (device guard): {_name(func)} at {_where(_caller())} "
        f"{what}. Move it with explorer.core.runtime.to_model (or to_host for results).")


def _guard_factory(name: str, original, origin: str):
    def factory(*args, **kwargs):
        if not ACTIVE:
            return original(*args, **kwargs)
        frame = _caller()
        if origin == "library" and kwargs.get("device") is None:
            raise DeviceGuardError(
                f"torch.{name}() without device= at {_where(frame)}: on a GPU this tensor would sit on the CPU while "
                "the model does not. Build it with device=explorer.core.runtime.HOST and move it with to_model, or "
                "build it like an existing tensor (torch.*_like, .new_*).")
        return mark_host(original(*args, **kwargs))  # on a real machine too these are CPU tensors
    return factory


class _Torch(types.ModuleType):
    """`torch` as explorer's and the tests' modules see it while guarded: wrapped factories, the rest
    torch's own. (Wrapping torch's own attributes instead would change the functions torch function
    modes see: transformers' meta-device loading relies on their identity.)"""

    def __getattr__(self, name):
        return getattr(torch, name)


def _torch_for(origin: str) -> _Torch:
    proxy = _Torch("torch")
    for name in FACTORIES:
        factory = _guard_factory(name, getattr(torch, name), origin)
        factory.__name__ = name
        setattr(proxy, name, factory)
    return proxy


def _guard_move(name: str, original):
    def move(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if ACTIVE and type(self) is torch.Tensor and _names_device(name, args, kwargs):
            frame = _caller()
            if _origin(frame) and not _is_to_model(frame):
                return mark_host(out)  # a copy to the CPU made by the library or a test
        return out
    return move


def _guard_numpy(name: str, original):
    def to_numpy(self, *args, **kwargs):
        if ACTIVE and type(self) is torch.Tensor and self.numel():
            frame = _caller()
            if _origin(frame):
                raise DeviceGuardError(
                    f"{name} at {_where(frame)} reads a tensor on the model's device: on a GPU this raises. "
                    "Copy it with explorer.core.runtime.to_host first.")
        return original(self, *args, **kwargs)
    return to_numpy


_PROXIES: dict = {}


def watch_modules() -> None:
    """Give explorer's and the tests' modules imported so far the guarded `torch`."""
    for name, module in list(sys.modules.items()):
        origin = "library" if name == "explorer" or name.startswith("explorer.") else \
            "tests" if name.startswith("tests.") and name != __name__ else None
        if origin is None or getattr(module, "torch", None) is not torch or \
                str(getattr(module, "__file__", "")).startswith(EXEMPT):
            continue
        _ORIGINALS[(module, "torch")] = torch
        module.torch = _PROXIES.setdefault(origin, _torch_for(origin))


def _install() -> None:
    for owner, name, wrap in [(torch.Tensor, "to", _guard_move), (torch.Tensor, "cpu", _guard_move),
                              (torch.Tensor, "numpy", _guard_numpy), (torch.Tensor, "__array__", _guard_numpy)]:
        original = getattr(owner, name)
        _ORIGINALS[(owner, name)] = original
        wrapped = wrap(name, original)
        wrapped.__name__, wrapped.__wrapped__ = name, original
        setattr(owner, name, wrapped)
    import explorer  # every library module now, so that none escapes by being imported later
    for info in pkgutil.walk_packages(explorer.__path__, "explorer."):
        if not info.name.startswith(("explorer.surfaces.ui", "explorer.__main__")):  # ui imports streamlit
            importlib.import_module(info.name)
    watch_modules()


def _uninstall() -> None:
    for (owner, name), original in _ORIGINALS.items():
        setattr(owner, name, original)
    _ORIGINALS.clear()


@contextlib.contextmanager
def guarded():
    """The guard on within the block (for every thread: the wrappers are global)."""
    global ACTIVE, _depth
    if _depth == 0:
        _install()
    _depth += 1
    before, ACTIVE = ACTIVE, True
    try:
        yield
    finally:
        ACTIVE = before
        _depth -= 1
        if _depth == 0:
            _uninstall()


@contextlib.contextmanager
def paused():
    """The guard off within the block: for references computed wholly on the CPU (a model loaded there
    by the test itself), which the guard cannot tell from the model's device."""
    global ACTIVE
    before, ACTIVE = ACTIVE, False
    try:
        yield
    finally:
        ACTIVE = before


def is_host(t: torch.Tensor) -> bool:
    """Whether t would be on the CPU on a real machine (guard on), or is on the CPU (guard off)."""
    return isinstance(t, HostTensor) if ACTIVE else t.device.type == "cpu"
