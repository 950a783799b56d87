"""Writes the torch-format embedding fixtures beside this script, without torch installed.

torch.save (zip format, torch >= 1.6) pickles with protocol 2 and a persistent_id per storage:
('storage', torch.<Type>Storage, key, 'cpu', numel), and stores each storage raw, little-endian, as
<archive>/data/<key> in an uncompressed zip beside <archive>/data.pkl, <archive>/version and
<archive>/byteorder. Tensors are rebuilt by torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, backward_hooks) and parameters by torch._utils._rebuild_parameter. Stand-in
modules named torch and torch._utils let the standard pickler write exactly those globals.

Run: python3 make-torch-embeddings.py
"""
import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile

torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")
nn_container = types.ModuleType("torch.nn.modules.container")
sys.modules.update({"torch": torch, "torch._utils": utils, "torch.nn": types.ModuleType("torch.nn"),
                    "torch.nn.modules": types.ModuleType("torch.nn.modules"),
                    "torch.nn.modules.container": nn_container})


def _rebuild_tensor_v2(*args):
    raise NotImplementedError


def _rebuild_parameter(*args):
    raise NotImplementedError


_rebuild_tensor_v2.__module__ = "torch._utils"
_rebuild_parameter.__module__ = "torch._utils"
utils._rebuild_tensor_v2 = _rebuild_tensor_v2
utils._rebuild_parameter = _rebuild_parameter


class FloatStorage:
    pass


class HalfStorage:
    pass


FloatStorage.__module__ = HalfStorage.__module__ = "torch"
torch.FloatStorage = FloatStorage
torch.HalfStorage = HalfStorage


class ParameterDict:
    """Pickled as nn.Module is: copyreg._reconstructor, then its __dict__ as BUILD state."""

    def __init__(self, parameters):
        self.training = True
        self._parameters = collections.OrderedDict(parameters)
        self._buffers = collections.OrderedDict()
        self._modules = collections.OrderedDict()


ParameterDict.__module__ = "torch.nn.modules.container"
nn_container.ParameterDict = ParameterDict


class Storage:
    def __init__(self, kind, key, values):
        self.kind, self.key, self.values = kind, key, values

    def raw(self):
        fmt = "<%d%s" % (len(self.values), "f" if self.kind is FloatStorage else "e")
        return struct.pack(fmt, *self.values)


class Tensor:
    def __init__(self, storage, offset, size, stride, requires_grad):
        self.args = (storage, offset, size, stride, requires_grad, collections.OrderedDict())

    def __reduce__(self):
        return (_rebuild_tensor_v2, self.args)


class Parameter:
    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce__(self):
        return (_rebuild_parameter, (self.tensor, True, collections.OrderedDict()))


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.kind, obj.key, "cpu", len(obj.values))
        return None


def save(obj, storages, path, archive):
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(obj)
    def entry(name):
        # A fixed date keeps the files the same from run to run.
        return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(entry(f"{archive}/data.pkl"), buf.getvalue())
        z.writestr(entry(f"{archive}/byteorder"), "little")
        for s in storages:
            z.writestr(entry(f"{archive}/data/{s.key}"), s.raw())
        z.writestr(entry(f"{archive}/version"), "3\n")


def value(k):
    # Exact in float16 and float32: the reader's output is compared for equality.
    return ((k * 37) % 101 - 50) / 64


HIDDEN = 32
here = os.path.dirname(os.path.abspath(__file__))
os.makedirs(here, exist_ok=True)

# A1111's own format (Embedding.save): string_to_param holds a plain tensor that requires grad.
vec = Storage(FloatStorage, "0", [value(k) for k in range(2 * HIDDEN)])
save({"string_to_token": {"*": 265}, "string_to_param": {"*": Tensor(vec, 0, (2, HIDDEN), (HIDDEN, 1), True)},
      "name": "a1111-style", "step": 500, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny"},
     [vec], os.path.join(here, "a1111-style.pt"), "a1111-style")

# The original textual_inversion repository's format: an nn.ParameterDict of parameters, here float16
# and stored transposed (a strided view), with the storage shared past an offset.
half = Storage(HalfStorage, "7", [0.0] * 5 + [value(1000 + (k % 3) * HIDDEN + k // 3) for k in range(3 * HIDDEN)])
param = Parameter(Tensor(half, 5, (3, HIDDEN), (1, 3), True))
save({"string_to_token": {"*": 265}, "string_to_param": ParameterDict({"*": param}), "name": "ldm-style", "step": 6000},
     [half], os.path.join(here, "ldm-style.pt"), "archive")

# A diffusers concept (learned_embeds.bin): {token: 1-D tensor}.
concept = Storage(FloatStorage, "0", [value(2000 + k) for k in range(HIDDEN)])
save({"<concept>": Tensor(concept, 0, (HIDDEN,), (1,), False)}, [concept], os.path.join(here, "concept.bin"), "learned_embeds")

# A pickle that would run a command if it were unpickled by Python: the reader must only ever read it.
class Command:
    def __reduce__(self):
        return (os.system, ("touch /tmp/latentfarm-pickle-ran",))


save({"string_to_param": {"*": Command()}}, [], os.path.join(here, "runs-a-command.pt"), "archive")
