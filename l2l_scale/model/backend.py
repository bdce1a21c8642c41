"""Numeric precision and Keras backend: the one place that knows about bf16/fp16 and TensorFlow/JAX/PyTorch.

Precision
---------
``fp32`` is the default and the exactness reference. ``bf16`` and ``fp16`` build the same network under Keras'
mixed-precision policies (``mixed_bfloat16``, ``mixed_float16``): variables stay float32, so the same weights
files load, and the convolutions run at half width. The 1x1 output convolution, the residual addition, the last
activation and the probabilistic scale branch run in float32 (:func:`layer_dtypes`), so the output keeps full
precision where the residual adds the input back.

On a CPU without native half-width instructions the arithmetic is emulated and runs slower than fp32 (measured
here: fp16 at 0.24x of fp32 on an AVX512-BF16 CPU without AVX512-FP16), so :func:`check_precision` refuses
bf16/fp16 there; :func:`cpu_features` is the probe.

Backend
-------
Inference runs under any Keras 3 backend that ``KERAS_BACKEND`` names (``tensorflow``, ``jax`` or ``torch``);
the network is built from Keras layers by :func:`l2l_scale.model.build_unet`, so loading a model folder under JAX
or PyTorch never imports TensorFlow. Training stays on TensorFlow (``tf.distribute``). Nothing here imports
Keras or a backend at module import time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Callable

import numpy as np

from l2l_scale.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
BACKENDS = ("tensorflow", "jax", "torch")
_BACKEND_EXTRAS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
# CPU flags (/proc/cpuinfo) with native arithmetic at that width: x86 AVX512/AMX, ARM BF16 and FP16 ("asimdhp").
_CPU_FLAGS = {"bf16": {"avx512_bf16", "amx_bf16", "bf16"}, "fp16": {"avx512_fp16", "amx_fp16", "asimdhp"}}
_MAC_FEATURES = {"bf16": "hw.optional.arm.FEAT_BF16", "fp16": "hw.optional.arm.FEAT_FP16"}


# ---------------------------------------------------------------------------------------------------- precision


def check_precision(precision: Any, *, accelerator: bool = False) -> str:
    """Validate a precision name and refuse bf16/fp16 on a CPU that has no instructions for it.

    Parameters
    ----------
    precision : str
        ``fp32``, ``bf16`` or ``fp16``.
    accelerator : bool
        The network runs on a GPU (current GPUs run bf16 and fp16), so the CPU is not checked.

    Returns
    -------
    str
        The precision.

    Raises
    ------
    ConfigError
        Unknown name, or bf16/fp16 on a CPU without native support for it.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not supported; use one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and not accelerator and precision not in cpu_features():
        flags = ", ".join(sorted(_CPU_FLAGS[precision]))
        raise ConfigError(f"--precision {precision}: this CPU has no {precision} instructions ({flags}), so "
                          f"{precision} would run slower than fp32; use --precision fp32, or run on a GPU")
    return precision


def cpu_features() -> set[str]:
    """The half-width precisions (``bf16``, ``fp16``) this CPU computes natively.

    Linux: the ``flags``/``Features`` lines of ``/proc/cpuinfo``; macOS: ``sysctl hw.optional.arm.FEAT_*``;
    elsewhere none.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = None
    if text is not None:
        flags: set[str] = set()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags.update(value.split())
        return {p for p, names in _CPU_FLAGS.items() if flags & names}
    found = set()
    if platform.system() == "Darwin":
        for p, key in _MAC_FEATURES.items():
            try:
                out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            if out.strip() == "1":
                found.add(p)
    return found


def layer_dtypes(precision: str) -> tuple[Any, Any]:
    """Keras dtype policies ``(body, head)`` for :func:`l2l_scale.model.build_unet`.

    ``body`` is for the U-Net convolutions, pooling, up-sampling and concatenations; ``head`` for the output
    convolution, the residual addition, the last activation and the probabilistic branch. At fp32 both are None
    (the global policy), which keeps the fp32 network exactly as before.
    """
    check_precision(precision, accelerator=True)
    if precision == "fp32":
        return None, None
    import keras

    return keras.DTypePolicy(_POLICIES[precision]), keras.DTypePolicy("float32")


# ---------------------------------------------------------------------------------------------------- backend


def backend_name() -> str:
    """The Keras backend this process will use, without importing Keras.

    Keras reads ``KERAS_BACKEND`` first, then ``backend`` in ``$KERAS_HOME/keras.json`` (``~/.keras``), and
    defaults to TensorFlow.
    """
    name = os.environ.get("KERAS_BACKEND")
    if not name:
        home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
        try:
            name = json.loads((home / "keras.json").read_text()).get("backend")
        except (OSError, ValueError, AttributeError):
            name = None
    return name or "tensorflow"


def check_backend() -> str:
    """Check that the Keras backend named by ``KERAS_BACKEND`` is supported and installed.

    Returns
    -------
    str
        ``tensorflow``, ``jax`` or ``torch``.

    Raises
    ------
    ConfigError
        A backend l2l-scale does not run, or one that is not installed (with the install command).
    """
    name = backend_name()
    if name not in BACKENDS:
        raise ConfigError(f"KERAS_BACKEND={name} is not supported by l2l-scale; set KERAS_BACKEND to tensorflow "
                          "(the default), jax or torch")
    if not _installed(name):
        raise ConfigError(f"KERAS_BACKEND={name} names a Keras backend that is not installed; install it with "
                          f"pip install 'l2l-scale[{_BACKEND_EXTRAS[name]}]', or unset KERAS_BACKEND to use "
                          "TensorFlow")
    return name


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def make_predict_fn(keras_model: Any, n_channel_in: int) -> Callable[[np.ndarray], np.ndarray]:
    """One compiled forward pass ``float32 [B, H, W, C] -> numpy`` for the active backend, for every tile size.

    TensorFlow: a ``tf.function`` with unknown batch/height/width traces once (``predict_on_batch`` would retrace
    and warn for each new tile shape). JAX: ``jax.jit`` of the stateless call (one compilation per tile shape).
    PyTorch: the eager call without autograd. Each is safe to call from several threads.
    """
    import keras

    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec([None, None, None, n_channel_in], tf.float32)
        fn = tf.function(lambda x: keras_model(x, training=False), input_signature=[spec])
        return lambda x: fn(x).numpy()
    if backend == "jax":
        import jax

        trainable = [v.value for v in keras_model.trainable_variables]
        non_trainable = [v.value for v in keras_model.non_trainable_variables]
        jitted = jax.jit(lambda t, n, x: keras_model.stateless_call(t, n, x, training=False)[0])
        return lambda x: np.asarray(jitted(trainable, non_trainable, x))
    if backend == "torch":
        import torch

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return keras.ops.convert_to_numpy(keras_model(x, training=False))

        return run
    raise ConfigError(f"Keras backend {backend!r} is not supported; set KERAS_BACKEND to tensorflow, jax or torch")


def configure_threads(n_threads: int) -> None:
    """Limit the compute threads of the active backend (TensorFlow's two pools, or PyTorch's intra-op pool).

    Must run before the backend's first operation; JAX/XLA fixes its thread pool at start-up, so there it is a
    no-op.
    """
    backend = backend_name()
    if backend == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(n_threads))
            tf.config.threading.set_inter_op_parallelism_threads(int(n_threads))
        except RuntimeError:  # raised once the TF context exists: the settings cannot change any more
            pass
    elif backend == "torch" and n_threads:
        import torch

        torch.set_num_threads(int(n_threads))
