"""jax arrays as wire tensors (used by the JAX client and JAX endpoints).

A jax array reaches the wire through numpy: ``np.asarray`` is a view on CPU
and one device-to-host copy on an accelerator. Received bytes become a
``jax.Array`` without a copy where JAX can alias them (see :func:`as_jax`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradserve.frameworks import NO_SLOT
from gradserve.frameworks.numpy import ADAPTER as NUMPY
from gradserve.wire import dtypes
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.memory import WireTensor
from gradserve.wire.slots import ALIGN


def as_jax(array: np.ndarray, device: Any = None) -> jax.Array:
    """``array`` as a ``jax.Array`` on ``device`` (None: the default device).

    On CPU a writable, contiguous, 64-byte-aligned array of a dtype DLPack carries
    is aliased, not copied, and kept alive as long as the result is (which is then
    committed to its device, as DLPack imports are); anything else is copied.
    """
    platform = device.platform if device is not None else jax.default_backend()
    if (platform == "cpu" and array.size and array.flags.writeable
            and array.flags.c_contiguous and array.ctypes.data % ALIGN == 0):
        try:
            aliased: jax.Array = jax.dlpack.from_dlpack(array, device, copy=False)
            return aliased
        except (BufferError, ValueError):   # a dtype DLPack lacks, another CPU device
            pass
    return jnp.asarray(array) if device is None else jax.device_put(array, device)


class JaxAdapter:
    """``jax.Array``s, on any device JAX has."""

    name = "jax"

    def is_array(self, x: Any) -> bool:
        return isinstance(x, jax.Array)

    def wire_dtype(self, x: Any) -> pb.DType:
        return dtypes.code_of(np.dtype(x.dtype).name)

    def dtype_code(self, dtype: Any) -> pb.DType:
        return NUMPY.dtype_code(dtype)

    def to_wire(self, x: Any) -> WireTensor:
        return NUMPY.to_wire(np.asarray(x))

    def from_wire(self, t: WireTensor) -> jax.Array:
        return as_jax(NUMPY.from_wire(t))

    def empty(self, shape: tuple[int, ...], code: int, device: Any) -> jax.Array:
        array = jnp.zeros(shape, dtypes.numpy_dtype(code))
        return array if device is None else jax.device_put(array, device)

    def device(self, x: Any) -> Any:
        (device,) = x.devices()
        return device

    def copy(self, x: Any) -> jax.Array:
        return jnp.array(x, copy=True)

    def gpu(self, device: Any) -> int | None:
        # JAX arrays reach the wire through host memory: only a CPU array can be a
        # view of a slot (see as_jax)
        platform = device.platform if device is not None else jax.default_backend()
        return None if platform == "cpu" else NO_SLOT

    def constant_of(self, x: Any) -> tuple[str, str] | None:
        dtype = getattr(x, "dtype", None)   # jnp.float32 and its kin: scalar types
        if isinstance(dtype, np.dtype) and not self.is_array(x):
            return "dtype", dtypes.name_of(NUMPY.dtype_code(dtype))
        return None

    def constant(self, kind: str, name: str) -> Any:
        return NUMPY.constant(kind, name)

    def named(self, type_name: str, fields: tuple[str, ...], items: list[Any]) -> Any:
        return NUMPY.named(type_name, fields, items)


ADAPTER = JaxAdapter()
