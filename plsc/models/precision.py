"""The one place that knows a backbone may hold float16 weights.

``train.precision fp16`` on a GPU decorates the backbone with ``paddle.amp.decorate(level="O2")``: every
parameter becomes float16 except those of the normalisation layers (Paddle's ``amp_initialize``), and with
``save_dtype="float32"`` each layer gets a state-dict hook (Paddle's ``StateDictHook``) that makes
``state_dict()`` return float32 *copies*. So such a model's weights load only from tensors cast to float16
first (``set_state_dict`` checks dtypes), its forward runs only under ``paddle.amp.auto_cast`` on a GPU, and
writing into what ``state_dict()`` returns changes nothing.

The rules built on that, the same on every device:

- saved weights are float32, hook or not (as PLSC v2.2 and Paddle's ``save_dtype="float32"`` save them);
- loaded weights are cast to the dtype each tensor of the model has (PLSC v2.2 dynamic/utils/io.py:170-181
  casts every loaded tensor to its parameter's dtype the same way);
- whatever computes with the weights outside training (verification, export) runs a float32 copy of the
  model, so it computes exactly what a float32 model loaded from the saved checkpoint computes.
"""

from __future__ import annotations

import paddle


def own_state(model: paddle.nn.Layer) -> dict:
    """The model's parameters and persistable buffers themselves, in their own dtypes (no state-dict hook:
    writing into these tensors changes the model)."""
    return model.state_dict(use_hook=False)


def holds_float16(model: paddle.nn.Layer) -> bool:
    return any(tensor.dtype == paddle.float16 for tensor in own_state(model).values())


def float32_state(model: paddle.nn.Layer) -> dict:
    """The model's state with every floating tensor in float32 (float16 ones as copies), whether or not a
    state-dict hook would cast them."""
    return {key: _as_dtype(tensor, paddle.float32) for key, tensor in own_state(model).items()}


def fitted_state(model: paddle.nn.Layer, state: dict) -> dict:
    """``state`` with each floating tensor cast to the dtype of the model's tensor of the same key (keys the
    model does not have stay as they are, for the caller's fit check to name)."""
    own = own_state(model)
    return {key: _as_dtype(value, own[key].dtype) if key in own else value for key, value in state.items()}


def copy_weights(source: paddle.nn.Layer, target: paddle.nn.Layer) -> None:
    """Set ``target``'s weights to ``source``'s, each cast to ``target``'s dtype for it."""
    target.set_state_dict(fitted_state(target, float32_state(source)))


def _as_dtype(tensor, dtype):
    if not isinstance(tensor, paddle.Tensor) or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.astype(dtype)
