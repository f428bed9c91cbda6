"""FLOPs of a step counted over its jaxpr, every loop body times its trip count.

XLA's `compiled.cost_analysis()` counts the body of a while loop once, so it undercounts any
step with a loop in it: the blocked attention (`lax.map` over query blocks), gradient
accumulation (`lax.scan` over microbatches), scanned layers, a recurrent SSM. This counter
walks the step's jaxpr instead: a `scan` body counts `length` times, a `cond` its costliest
branch, calls (jit, remat, custom_jvp/vjp, shard_map) their bodies; a `while_loop`, whose
trip count is known only at run time, counts once and is reported in `Count.uncounted_loops`.
jax's `jax.experimental.roofline` walks jaxprs too but counts a scan body once and has no FFT.

Conventions are XLA's (HloCostAnalysis), so both counts agree on a loop-free step:
dot_general 2·batch·M·N·K; convolution 2 · output elements · (input features per group ·
kernel window) (padding counted); FFT 8 · operand elements · Π floor(log2 n) over the
transformed lengths; elementwise arithmetic, comparisons, selects and casts 1 per output
element (cumulative sums too, where XLA's count depends on its lowering); reductions 1 per
input element not in the output; transcendentals (exp, log, tanh, rsqrt, pow, ...) 0, as XLA
counts them apart; data movement (reshape, gather, slices) 0. Random bit generation is 0 here
while XLA counts its integer ops, so with dropout XLA's count of a loop-free step is a little
higher.
"""

from __future__ import annotations

import dataclasses
import math

import jax.extend as jex
import numpy as np

_ELEMENTWISE = frozenset({
    "add", "add_any", "sub", "mul", "div", "rem", "max", "min", "neg", "abs", "sign",
    "square", "floor", "ceil", "round", "clamp", "select_n", "convert_element_type",
    "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor", "nextafter",
    "shift_left", "shift_right_logical", "shift_right_arithmetic", "is_finite", "copysign",
    "cumsum", "cumprod", "cummax", "cummin",
})
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                         "reduce_or", "reduce_xor", "argmax", "argmin"})


@dataclasses.dataclass
class Count:
    """FLOPs of a jaxpr and a line naming each while loop whose body counted only once."""

    flops: float = 0.0
    uncounted_loops: list = dataclasses.field(default_factory=list)


def count(jaxpr) -> Count:
    """The FLOPs of `jaxpr` (a Jaxpr or ClosedJaxpr, e.g. `jax.jit(f).trace(*args).jaxpr`),
    over the whole (global) arrays it traces."""
    out = Count()
    out.flops = _jaxpr_flops(jaxpr, out.uncounted_loops)
    return out


def _jaxpr_flops(jaxpr, loops: list) -> float:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
    return sum(_eqn_flops(eqn, loops) for eqn in _live_eqns(jaxpr))


def _live_eqns(jaxpr) -> list:
    """The equations some output or effect depends on (XLA drops the others as dead code)."""
    live = {v for v in jaxpr.outvars if isinstance(v, jex.core.Var)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in live for v in eqn.outvars):
            kept.append(eqn)
            live.update(v for v in eqn.invars if isinstance(v, jex.core.Var))
    return kept[::-1]


def _eqn_flops(eqn, loops: list) -> float:
    name, params = eqn.primitive.name, eqn.params
    if name == "scan":
        return params["length"] * _jaxpr_flops(params["jaxpr"], loops)
    if name == "while":
        body = _jaxpr_flops(params["body_jaxpr"], loops)
        loops.append(f"a while loop at {jex.source_info_util.summarize(eqn.source_info)} "
                     f"({body:.4g} FLOPs per iteration) counted once: its trip count is "
                     "known only at run time")
        return body + _jaxpr_flops(params["cond_jaxpr"], loops)
    if name == "cond":
        return max(_jaxpr_flops(branch, loops) for branch in params["branches"])
    if name == "shard_map":  # the body sees one device's blocks, on each device of its axes
        devices = math.prod(params["mesh"].shape[a] for a in params["newly_manual_axes"])
        return devices * _jaxpr_flops(params["jaxpr"], loops)
    inner = [v for v in params.values() if isinstance(v, (jex.core.Jaxpr, jex.core.ClosedJaxpr))]
    if inner:  # jit, remat, custom_jvp_call, custom_vjp_call, closed_call, ...
        return sum(_jaxpr_flops(j, loops) for j in inner)
    return _primitive_flops(name, params, [v.aval for v in eqn.invars],
                            [v.aval for v in eqn.outvars])


def _primitive_flops(name: str, params: dict, ins: list, outs: list) -> float:
    if name == "dot_general":
        (contract, _), (batch, _) = params["dimension_numbers"]
        lhs, rhs = ins
        shared = math.prod(lhs.shape[i] for i in (*contract, *batch))
        return 2.0 * _size(lhs) * _size(rhs) / max(shared, 1)
    if name == "conv_general_dilated":
        out_features = ins[1].shape[params["dimension_numbers"].rhs_spec[0]]
        return 2.0 * _size(outs[0]) * _size(ins[1]) / out_features
    if name == "fft":
        logs = math.prod(int(math.log2(n)) for n in params["fft_lengths"])
        return 8.0 * _size(ins[0]) * logs
    if name in _REDUCTIONS:
        return float(_size(ins[0]) - _size(outs[0]))
    if name in _ELEMENTWISE:
        return float(sum(_size(o) for o in outs))
    if name == "integer_pow":  # x**y is |y|-1 multiplies (and a divide when y < 0)
        return float(_size(outs[0]) * max(abs(params["y"]) - 1 + (params["y"] < 0), 0))
    return 0.0


def _size(aval) -> int:
    return int(np.prod(aval.shape, dtype=np.int64))
