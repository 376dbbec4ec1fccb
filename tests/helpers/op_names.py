"""A dispatch mode that notes the name of every operation run under it (``aten.addbmm``, ...)."""
from torch.utils._python_dispatch import TorchDispatchMode


class OpNames(TorchDispatchMode):

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
