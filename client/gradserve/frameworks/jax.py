"""jax arrays as wire tensors (used by the JAX client and JAX endpoints).

A jax array reaches the wire through numpy: ``np.asarray`` is a view on CPU
and one device-to-host copy on an accelerator.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradserve import dtypes, frameworks
from gradserve.frameworks import WireTensor
from gradserve.frameworks.numpy import ADAPTER as NUMPY


class JaxAdapter:
    name = "jax"

    def is_array(self, x: Any) -> bool:
        return isinstance(x, jax.Array)

    def wire_dtype(self, x: Any) -> int:
        return dtypes.code_of(np.dtype(x.dtype).name)

    def to_wire(self, x: Any) -> WireTensor:
        return NUMPY.to_wire(np.asarray(x))

    def from_wire(self, t: WireTensor) -> jax.Array:
        return jnp.asarray(NUMPY.from_wire(t))


ADAPTER = JaxAdapter()
frameworks.register(ADAPTER)
