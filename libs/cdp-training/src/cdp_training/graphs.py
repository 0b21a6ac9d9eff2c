"""ONNX graphs the training pipeline builds or extends by hand, and the spec written into every file.

The CLV graph computes BG/NBD and Gamma-Gamma from profile features at serving time, in float64, with
the Gaussian hypergeometric function as a truncated series after Euler's transformation (see
`bgnbd.series_terms`): term k is sign_k · exp(prefix + cumsum of log ratios for j < k), the prefix
(1-z)^(a-1) added inside the exponent, so no term overflows however large x is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from cdp_scoring.domain import METADATA_KEY, ModelSpec
from cdp_training.bgnbd import OCCASION_DAYS, BgNbd, GammaGamma, repeat_occasions, series_terms

OPSET = 17
PRODUCER = "cdp-scoring-training"
CLV_OUTPUTS = ("p_alive", "expected_purchases", "expected_order_value", "clv")


def with_spec(model: onnx.ModelProto, spec: ModelSpec) -> onnx.ModelProto:
    """The model carrying `spec` under metadata key `cdp.model` (replacing any earlier one)."""
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=spec.to_json()))
    model.producer_name = PRODUCER
    model.doc_string = spec.description
    # same seed, same bytes: converters name graphs with a random uuid and list opsets in set order
    model.graph.name = spec.name
    opsets = sorted(model.opset_import, key=lambda o: o.domain)
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return model


def batch_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Declare every output's first dimension as the batch (converters sometimes write a fixed 1)."""
    for output in model.graph.output:
        shape = output.type.tensor_type.shape
        if shape.dim:
            shape.dim[0].Clear()
            shape.dim[0].dim_param = "N"
    return model


def run(model: onnx.ModelProto | bytes, rows: np.ndarray) -> dict[str, np.ndarray]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: rows.astype(np.float32)}), strict=True))


def score_columns(spec: ModelSpec, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each score of the spec as one value per row, read as the scoring service reads it."""
    out = {}
    for item in spec.outputs:
        tensor = outputs[item.output]
        out[item.score] = tensor if tensor.ndim == 1 else tensor[:, item.index]
    return out


def _const(name: str, value: np.ndarray | float, dtype: type = np.float64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def clv_graph(
    bgnbd: BgNbd,
    gamma_gamma: GammaGamma,
    *,
    input_name: str,
    horizon_days: float,
    terms: int,
    occasion_days: float = OCCASION_DAYS,
) -> onnx.ModelProto:
    """features [N, 5] = (orders_total, days since first order, days since last order, average order value,
    days since sign-up) -> p_alive, expected purchases in the next `horizon_days`, expected order value, CLV.

    x counts repeat purchase occasions: the orders after the first, at most one per whole `occasion_days`
    between the first and the last order (`bgnbd.repeat_occasions`), so a burst of orders is one occasion.
    Without an order the BG/NBD formulas are read with x = 0 and T = days since sign-up (a customer about
    whom only "no purchase over T" is known); p_alive is then 1 by the model (dropout follows a purchase)."""
    r, alpha, a, b = bgnbd.r, bgnbd.alpha, bgnbd.a, bgnbd.b
    # no graph serves a meaningless prediction: a != 1 and a + b > 1, and Gamma-Gamma q > 1 (else the
    # expected order value of a customer with few orders is negative or infinite); raises bgnbd.FitRejected
    bgnbd.check()
    gamma_gamma.check()
    horizon = horizon_days / 7.0
    j = np.arange(terms, dtype=np.float64)[None, :]
    ln_factor, sign = series_terms(bgnbd, terms)
    inits = [
        _const("zero", 0.0),
        _const("one", 1.0),
        _const("week", 7.0),
        _const("occasion_days", occasion_days),
        _const("r", r),
        _const("alpha", alpha),
        _const("b_minus_1", b - 1),
        _const("ln_a", np.log(a)),
        _const("a_plus_b_minus_1", a + b - 1),
        _const("a_minus_1", a - 1),
        _const("horizon", horizon),
        _const("ln_horizon", np.log(horizon)),
        _const("gg_p", gamma_gamma.p),
        _const("gg_gamma", gamma_gamma.gamma),
        _const("gg_q_minus_1", gamma_gamma.q - 1),
        _const("j", j),
        _const("ln_factor", ln_factor[None, :]),
        _const("sign", sign[None, :]),
        _const("flat", np.array([-1], dtype=np.int64), np.int64),
    ]
    inits += [_const(f"col{k}", np.array([k], dtype=np.int64), np.int64) for k in range(5)]
    n = helper.make_node
    nodes = [n("Cast", [input_name], ["X"], to=TensorProto.DOUBLE)]
    for k, name in enumerate(("raw_orders", "raw_first", "raw_last", "raw_aov", "raw_seen")):
        nodes.append(n("Gather", ["X", f"col{k}"], [name], axis=1))  # [N, 1]
    nodes += [
        n("Max", ["raw_orders", "zero"], ["orders"]),
        n("Max", ["raw_first", "zero"], ["first"]),
        n("Max", ["raw_last", "zero"], ["last"]),
        n("Max", ["raw_aov", "zero"], ["aov"]),
        n("Max", ["raw_seen", "zero"], ["seen"]),
        n("Greater", ["orders", "zero"], ["has_order"]),
        n("Sub", ["first", "last"], ["span_days"]),
        n("Max", ["span_days", "zero"], ["span_pos"]),
        n("Where", ["has_order", "span_pos", "zero"], ["tx_days"]),
        # x = repeat occasions: orders after the first, at most one per whole occasion_days of the span
        n("Sub", ["orders", "one"], ["orders_minus_1"]),
        n("Max", ["orders_minus_1", "zero"], ["repeat_orders"]),
        n("Div", ["tx_days", "occasion_days"], ["span_occasions"]),
        n("Floor", ["span_occasions"], ["whole_occasions"]),
        n("Min", ["repeat_orders", "whole_occasions"], ["x"]),
        n("Greater", ["x", "zero"], ["has_repeat"]),
        # T and t_x in weeks; without an order T is the time since sign-up and t_x is 0
        n("Where", ["has_order", "first", "seen"], ["T_days"]),
        n("Div", ["T_days", "week"], ["T"]),
        n("Div", ["tx_days", "week"], ["tx_raw"]),
        n("Min", ["tx_raw", "T"], ["tx"]),
        # p_alive = 1 / (1 + [x > 0] a / (b + x - 1) ((alpha + T) / (alpha + t_x))^(r + x))
        n("Add", ["r", "x"], ["A"]),
        n("Add", ["alpha", "T"], ["alpha_T"]),
        n("Add", ["alpha", "tx"], ["alpha_tx"]),
        n("Log", ["alpha_T"], ["ln_alpha_T"]),
        n("Log", ["alpha_tx"], ["ln_alpha_tx"]),
        n("Sub", ["ln_alpha_T", "ln_alpha_tx"], ["ln_ratio"]),
        n("Max", ["x", "one"], ["x_safe"]),
        n("Add", ["b_minus_1", "x_safe"], ["b_x_1"]),
        n("Log", ["b_x_1"], ["ln_b_x_1"]),
        n("Sub", ["ln_a", "ln_b_x_1"], ["ln_odds_head"]),
        n("Mul", ["A", "ln_ratio"], ["ln_odds_tail"]),
        n("Add", ["ln_odds_head", "ln_odds_tail"], ["ln_odds"]),
        n("Exp", ["ln_odds"], ["odds_repeat"]),
        n("Where", ["has_repeat", "odds_repeat", "zero"], ["odds"]),
        n("Add", ["one", "odds"], ["alive_denominator"]),
        n("Div", ["one", "alive_denominator"], ["p_alive_2d"]),
        # ((alpha+T)/(alpha+T+t))^A 2F1(A, B; C; z) with A = r + x, B = b + x, C = a + b + x - 1, z = t / (alpha + T + t),
        # by Euler's transformation (1-z)^(a-1) 2F1(a+b-1-r, a-1; C; z): only C depends on the input
        n("Add", ["a_plus_b_minus_1", "x"], ["C"]),
        n("Add", ["alpha_T", "horizon"], ["alpha_T_t"]),
        n("Log", ["alpha_T_t"], ["ln_alpha_T_t"]),
        n("Sub", ["ln_horizon", "ln_alpha_T_t"], ["ln_z"]),
        n("Sub", ["ln_alpha_T", "ln_alpha_T_t"], ["ln_one_minus_z"]),
        n("Mul", ["a_minus_1", "ln_one_minus_z"], ["ln_prefix"]),
        n("Add", ["C", "j"], ["C_j"]),
        n("Log", ["C_j"], ["ln_C_j"]),
        n("Sub", ["ln_factor", "ln_C_j"], ["ln_ratio_j"]),
        n("Add", ["ln_ratio_j", "ln_z"], ["ln_step"]),  # [N, K]: log |term(j+1) / term(j)|
        n("CumSum", ["ln_step", "axis1"], ["ln_term"], exclusive=1),  # term 0 is 1
        n("Add", ["ln_term", "ln_prefix"], ["ln_scaled_term"]),
        n("Exp", ["ln_scaled_term"], ["abs_term"]),
        n("Mul", ["abs_term", "sign"], ["scaled_term"]),
        n("ReduceSum", ["scaled_term", "axes1"], ["scaled_2f1"], keepdims=1),
        # E[Y(t)] = (C / (a - 1)) (1 - prefix 2F1) p_alive
        n("Sub", ["one", "scaled_2f1"], ["bracket"]),
        n("Div", ["C", "a_minus_1"], ["head"]),
        n("Mul", ["head", "bracket"], ["unconditional"]),
        n("Mul", ["unconditional", "p_alive_2d"], ["expected_2d"]),
        # Gamma-Gamma: E[value] = p (gamma + orders · aov) / (p · orders + q - 1)
        n("Mul", ["orders", "aov"], ["spent"]),
        n("Add", ["gg_gamma", "spent"], ["gg_num_inner"]),
        n("Mul", ["gg_p", "gg_num_inner"], ["gg_num"]),
        n("Mul", ["gg_p", "orders"], ["p_orders"]),
        n("Add", ["p_orders", "gg_q_minus_1"], ["gg_den"]),
        n("Div", ["gg_num", "gg_den"], ["value_2d"]),
        n("Mul", ["expected_2d", "value_2d"], ["clv_2d"]),
    ]
    inits += [
        _const("axis1", np.array(1, dtype=np.int64), np.int64),
        _const("axes1", np.array([1], dtype=np.int64), np.int64),
    ]
    for source, out in zip(("p_alive_2d", "expected_2d", "value_2d", "clv_2d"), CLV_OUTPUTS, strict=True):
        nodes.append(n("Reshape", [source, "flat"], [f"{out}_f64"]))
        nodes.append(n("Cast", [f"{out}_f64"], [out], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes,
        "clv_bgnbd_gamma_gamma",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N"]) for out in CLV_OUTPUTS],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=PRODUCER)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def reference_clv(
    bgnbd: BgNbd,
    gamma_gamma: GammaGamma,
    features: np.ndarray,
    horizon_days: float,
    occasion_days: float = OCCASION_DAYS,
) -> dict[str, np.ndarray]:
    """What the CLV graph must output, from numpy/scipy (hyp2f1, gammaln) in float64."""
    f = np.maximum(np.asarray(features, dtype=np.float64), 0)
    orders, first, last, aov, seen = f.T
    has = orders > 0
    span_days = np.where(has, np.maximum(first - last, 0), 0)
    x = repeat_occasions(orders, span_days, occasion_days)
    T = np.where(has, first, seen) / 7
    t_x = np.minimum(span_days / 7, T)
    p_alive = bgnbd.p_alive(x, t_x, T)
    expected = bgnbd.expected(horizon_days / 7, x, t_x, T)
    value = gamma_gamma.expected(orders, aov)
    return {"p_alive": p_alive, "expected_purchases": expected, "expected_order_value": value, "clv": expected * value}


def isolation_forest_graph(forest: Any, width: int, *, input_name: str, output: str = "anomaly") -> onnx.ModelProto:
    """An sklearn IsolationForest as one TreeEnsembleRegressor: output = -decision_function, i.e.
    2^(-Σ path lengths / (trees · c(max_samples))) + offset_ (higher = more anomalous).

    Each leaf's weight is the path length sklearn adds for it (node depth + c(leaf samples) - 1) and each
    tree reads its own feature order (estimators_features_). Thresholds are rounded down to float32, so a
    float32 input goes left exactly when sklearn's `x <= threshold` does. (skl2onnx builds a graph per tree,
    which takes minutes for a few hundred trees.)"""
    attrs: dict[str, list[Any]] = {
        key: []
        for key in (
            "nodes_treeids",
            "nodes_nodeids",
            "nodes_featureids",
            "nodes_values",
            "nodes_modes",
            "nodes_truenodeids",
            "nodes_falsenodeids",
            "target_treeids",
            "target_nodeids",
            "target_ids",
            "target_weights",
        )
    }
    for tree_id, (estimator, features) in enumerate(zip(forest.estimators_, forest.estimators_features_, strict=True)):
        tree = estimator.tree_
        lengths = forest._decision_path_lengths[tree_id] + forest._average_path_length_per_tree[tree_id] - 1.0
        for node in range(tree.node_count):
            left, right = int(tree.children_left[node]), int(tree.children_right[node])
            leaf = left == -1
            threshold = np.float32(tree.threshold[node])
            if not leaf and float(threshold) > tree.threshold[node]:
                threshold = np.nextafter(threshold, np.float32(-np.inf))
            attrs["nodes_treeids"].append(tree_id)
            attrs["nodes_nodeids"].append(node)
            attrs["nodes_featureids"].append(0 if leaf else int(features[tree.feature[node]]))
            attrs["nodes_values"].append(0.0 if leaf else float(threshold))
            attrs["nodes_modes"].append("LEAF" if leaf else "BRANCH_LEQ")
            attrs["nodes_truenodeids"].append(0 if leaf else left)
            attrs["nodes_falsenodeids"].append(0 if leaf else right)
            if leaf:
                attrs["target_treeids"].append(tree_id)
                attrs["target_nodeids"].append(node)
                attrs["target_ids"].append(0)
                attrs["target_weights"].append(float(lengths[node]))
    max_samples = forest._max_samples
    average_path = 2.0 * (np.log(max_samples - 1.0) + np.euler_gamma) - 2.0 * (max_samples - 1.0) / max_samples
    scale = -np.log(2.0) / (len(forest.estimators_) * average_path)
    nodes = [
        helper.make_node(
            "TreeEnsembleRegressor",
            [input_name],
            ["path_length_sum"],
            domain="ai.onnx.ml",
            n_targets=1,
            aggregate_function="SUM",
            post_transform="NONE",
            **attrs,
        ),
        helper.make_node("Mul", ["path_length_sum", "scale"], ["log_score"]),
        helper.make_node("Exp", ["log_score"], ["score"]),
        helper.make_node("Add", ["score", "offset"], [output]),
    ]
    graph = helper.make_graph(
        nodes,
        "isolation_forest",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", 1])],
        [_const("scale", scale, np.float32), _const("offset", forest.offset_, np.float32)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", 3)],
        producer_name=PRODUCER,
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def with_ratios(model: onnx.ModelProto, input_name: str, width: int, pairs: list[tuple[int, int]]) -> onnx.ModelProto:
    """The model reading `width` columns, with a column appended before its own nodes for each (numerator,
    denominator) pair of input columns: their ratio, NaN where the denominator is not above 0 (`ratios`
    computes the same in numpy). The model itself was trained on the `width + len(pairs)` columns."""
    graph = model.graph
    wide = f"{input_name}_with_ratios"
    for node in graph.node:
        node.input[:] = [wide if name == input_name else name for name in node.input]
    numerators, denominators = zip(*pairs, strict=True)
    nodes = [
        helper.make_node("Gather", [input_name, "ratio_numerators"], ["ratio_num"], axis=1),
        helper.make_node("Gather", [input_name, "ratio_denominators"], ["ratio_den"], axis=1),
        helper.make_node("Greater", ["ratio_den", "ratio_zero"], ["ratio_defined"]),
        helper.make_node("Where", ["ratio_defined", "ratio_den", "ratio_one"], ["ratio_safe_den"]),
        helper.make_node("Div", ["ratio_num", "ratio_safe_den"], ["ratio_value"]),
        helper.make_node("Where", ["ratio_defined", "ratio_value", "ratio_nan"], ["ratio_columns"]),
        helper.make_node("Concat", [input_name, "ratio_columns"], [wide], axis=1),
    ]
    initializers = [
        numpy_helper.from_array(np.array(numerators, dtype=np.int64), "ratio_numerators"),
        numpy_helper.from_array(np.array(denominators, dtype=np.int64), "ratio_denominators"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "ratio_zero"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "ratio_one"),
        numpy_helper.from_array(np.array(np.nan, dtype=np.float32), "ratio_nan"),
    ]
    own = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + own)
    graph.initializer.extend(initializers)
    (entry,) = [i for i in graph.input if i.name == input_name]
    entry.type.tensor_type.shape.dim[1].dim_value = width
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("", OPSET))
    onnx.checker.check_model(model)
    return model


def ratios(X: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    """`X` (float32) with the ratio columns `with_ratios` appends in the graph, computed the same way."""
    X = np.asarray(X, dtype=np.float32)
    columns = []
    for numerator, denominator in pairs:
        den = X[:, denominator]
        defined = den > 0
        value = X[:, numerator] / np.where(defined, den, np.float32(1.0))
        columns.append(np.where(defined, value, np.float32(np.nan)).astype(np.float32))
    return np.hstack([X, np.stack(columns, axis=1)]) if columns else X


def append_nodes(
    model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
    outputs: list[onnx.ValueInfoProto],
    *,
    keep_outputs: tuple[str, ...] | None = None,
) -> onnx.ModelProto:
    """The model with extra nodes after its own (e.g. a second output computed from the input)."""
    graph = model.graph
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    if keep_outputs is not None:
        kept = [o for o in graph.output if o.name in keep_outputs]
        del graph.output[:]
        graph.output.extend(kept)
    graph.output.extend(outputs)
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("", OPSET))
    onnx.checker.check_model(model)
    return model
