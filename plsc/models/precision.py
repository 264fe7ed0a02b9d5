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
  model, so it computes exactly what a float32 model loaded from the saved checkpoint computes;
- a saved optimizer state loads into either precision's optimizer (:func:`restore_optimizer_state`).
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


# Paddle names a float16 parameter's float32 master weight <parameter name>_fp32_master_0 (made in a fresh
# name scope, as TrainStep steps) and each optimizer accumulator <owner>_<kind>_0, whose owner is the
# master weight where the optimizer keeps one (multi-precision, a float16 parameter), else the parameter.
MASTER_SUFFIX = "_fp32_master_0"


def restore_optimizer_state(optimizer, model: paddle.nn.Layer, state: dict, weights: dict) -> None:
    """Load a saved optimizer ``state`` into ``optimizer`` (over ``model``'s parameters), whichever precision
    saved it; ``weights`` is the checkpoint's float32 backbone state (keyed as ``state_dict()``).

    A state saved in the other form (fp16 with master weights, or float32) would load, and then stop the
    first step: the optimizer finds its accumulators by owner name. So they are renamed to the owner this
    optimizer uses and cast to its dtype. Master weights the state lacks are made from ``weights`` (not from
    the float16 parameters, which lost their low bits); a float32 parameter whose run kept a master weight
    takes the master (the float32 weight that run trained).
    """
    state = dict(state)
    saved_masters = state.pop("master_weights", {})
    masters = {}
    with paddle.no_grad():
        for key, param in model.named_parameters():
            mastered = bool(getattr(optimizer, "_multi_precision", False)) and param.dtype == paddle.float16
            master_name = param.name + MASTER_SUFFIX
            owner, other = (master_name, param.name) if mastered else (param.name, master_name)
            for name in _accumulators_of(state, other):
                state[owner + name[len(other):]] = state.pop(name)
            for name in _accumulators_of(state, owner):
                state[name] = _as_dtype(state[name], _accumulator_dtype(optimizer, param, mastered))
            if mastered:
                masters[param.name] = _master_weight(saved_masters.get(param.name), weights[key], master_name)
            elif param.name in saved_masters:
                param.set_value(_as_dtype(saved_masters[param.name], param.dtype))
    if masters:
        state["master_weights"] = masters
    optimizer.set_state_dict(state)


def _accumulator_dtype(optimizer, param, mastered: bool):
    """The dtype ``optimizer`` keeps ``param``'s accumulators in: float32 with a master weight; else the
    parameter's for Momentum's velocity, but float32 for AdamW's moments and beta powers whatever the
    parameter (Paddle's AdamW._add_moments_pows makes float16 parameters' accumulators float32)."""
    if mastered or isinstance(optimizer, paddle.optimizer.AdamW):
        return paddle.float32
    return param.dtype


def _master_weight(saved, weight, name: str):
    """The saved master weight, else one made from the checkpoint's float32 ``weight``; named as Paddle names
    it (its accumulators are found by this name)."""
    master = saved if saved is not None else paddle.to_tensor(weight.numpy().astype("float32"))
    master.name = name
    return master


def _accumulators_of(state: dict, owner: str) -> list[str]:
    """The keys of ``state`` that are accumulators of ``owner`` (a parameter's or a master weight's name)."""
    return [name for name in state if name.startswith(owner + "_")
            and not name.startswith(owner + MASTER_SUFFIX + "_")]
