"""ONNX Runtime sessions: load a model file, check it against its own spec, run rows through it.

`load_model` is the gate DeployModel goes through: a file that does not load, whose input does not take
the spec's features, whose outputs are not the ones the spec names, or whose test vector does not give
finite scores (or the expected ones) is refused with the reason, before anything is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from cdp_kit.errors import InvalidArgument
from cdp_scoring.domain import FeatureAssembler, ModelSpec

_FLOAT_TYPES = {"tensor(float)"}
# From this many rows a call runs on a worker thread; fewer cost less than the hand-over.
THREAD_ROWS = 64

_NUMERIC_OUTPUTS = {"tensor(float)", "tensor(double)", "tensor(int64)", "tensor(int32)", "tensor(float16)"}


@dataclass(slots=True)
class LoadedModel:
    """A validated model: its spec, a ready session and the plan for reading scores out of it."""

    spec: ModelSpec
    session: ort.InferenceSession
    assembler: FeatureAssembler
    sha256: str
    size_bytes: int
    # The output tensors to fetch, and for each score (in spec order) which of them and which column.
    fetch: list[str] = field(default_factory=list)
    columns: list[tuple[int, int | None]] = field(default_factory=list)
    _queue: list[tuple[np.ndarray, asyncio.Future]] = field(default_factory=list, repr=False)
    _draining: bool = field(default=False, repr=False)

    def run(self, rows: np.ndarray) -> np.ndarray:
        """Scores of float32 rows [n, features] as float64 [n, scores] (columns in spec output order)."""
        if rows.dtype != np.float32:
            rows = rows.astype(np.float32)
        outputs = self.session.run(self.fetch, {self.spec.input: rows})
        result = np.empty((rows.shape[0], len(self.columns)), dtype=np.float64)
        for j, (which, column) in enumerate(self.columns):
            tensor = outputs[which]
            result[:, j] = tensor.reshape(rows.shape[0]) if column is None else tensor[:, column]
        return result

    async def score(self, rows: np.ndarray) -> np.ndarray:
        """run(), batched with whatever other callers asked of this model meanwhile.

        Partition handlers run side by side and each asks every model it needs for a few rows; one
        onnxruntime call per model for all of them costs far less than one each (a call has a fixed cost,
        and a graph like the CLV model's is mostly fixed cost at a few rows). Nothing waits for a batch to
        fill: a call starts as soon as the previous one of this model is done, with everything queued by
        then. Large calls run on a worker thread (onnxruntime releases the GIL)."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((rows, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            await asyncio.sleep(0)  # callers ready at this moment join the call
            while self._queue:
                batch, self._queue = self._queue, []
                matrix = batch[0][0] if len(batch) == 1 else np.concatenate([rows for rows, _ in batch])
                try:
                    if len(matrix) >= THREAD_ROWS:
                        scores = await asyncio.to_thread(self.run, matrix)
                    else:
                        scores = self.run(matrix)
                except Exception as exc:
                    for _rows, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                offset = 0
                for rows, future in batch:
                    if not future.done():
                        future.set_result(scores[offset : offset + len(rows)])
                    offset += len(rows)
        finally:
            self._draining = False

    def run_one(self, row: list[float]) -> list[float]:
        """One person's scores: the same as run() on one row, without the matrix bookkeeping."""
        outputs = self.session.run(self.fetch, {self.spec.input: np.array((row,), dtype=np.float32)})
        return [
            float(outputs[which].flat[0] if column is None else outputs[which][0, column])
            for which, column in self.columns
        ]


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    # Small models, many calls: threads beyond one per call only contend with the event loop and the
    # other sessions on a small machine; batch work spreads over calls instead.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def load_model(data: bytes, *, threads: int = 1) -> LoadedModel:
    """Load and validate an ONNX file that carries its spec; InvalidArgument says what is wrong."""
    if not data:
        raise InvalidArgument("onnx", "is empty: send the bytes of an .onnx file")
    try:
        session = ort.InferenceSession(data, sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for every kind of bad file
        raise InvalidArgument("onnx", f"is not a loadable ONNX model: {str(exc).splitlines()[0][:300]}") from None
    spec = ModelSpec.from_metadata(session.get_modelmeta().custom_metadata_map)
    inputs = {i.name: i for i in session.get_inputs()}
    if spec.input not in inputs:
        raise InvalidArgument(
            "spec.input", f"the model has no input {spec.input!r}; its inputs are {', '.join(sorted(inputs))}"
        )
    if len(inputs) != 1:
        raise InvalidArgument(
            "onnx", f"the model has {len(inputs)} inputs ({', '.join(sorted(inputs))}); cdp feeds one feature matrix"
        )
    model_input = inputs[spec.input]
    if model_input.type not in _FLOAT_TYPES:
        raise InvalidArgument("onnx", f"input {spec.input!r} is {model_input.type}; cdp feeds tensor(float) rows")
    shape = model_input.shape
    if len(shape) != 2:
        raise InvalidArgument("onnx", f"input {spec.input!r} has shape {shape}; expected [batch, features]")
    if isinstance(shape[1], int) and shape[1] != len(spec.features):
        raise InvalidArgument(
            "spec.features",
            f"the spec lists {len(spec.features)} features but input {spec.input!r} takes {shape[1]} columns",
        )
    outputs = {o.name: o for o in session.get_outputs()}
    fetch: list[str] = []
    columns: list[tuple[int, int | None]] = []
    for i, out in enumerate(spec.outputs):
        tensor = outputs.get(out.output)
        if tensor is None:
            raise InvalidArgument(
                f"spec.outputs[{i}].output",
                f"the model has no output {out.output!r}; its outputs are {', '.join(sorted(outputs))}",
            )
        if tensor.type not in _NUMERIC_OUTPUTS:
            raise InvalidArgument(
                f"spec.outputs[{i}].output",
                f"output {out.output!r} is {tensor.type}, not a numeric tensor "
                "(convert classifiers without ZipMap, e.g. skl2onnx options {'zipmap': False})",
            )
        if out.output not in fetch:
            fetch.append(out.output)
        rank = len(tensor.shape)
        column: int | None
        if rank == 1 or (rank == 2 and tensor.shape[1] == 1 and out.index == 0):
            column = None
        elif rank == 2:
            width = tensor.shape[1]
            if isinstance(width, int) and out.index >= width:
                raise InvalidArgument(
                    f"spec.outputs[{i}].index",
                    f"output {out.output!r} has {width} columns; {out.index} is out of range",
                )
            column = out.index
        else:
            raise InvalidArgument(
                f"spec.outputs[{i}].output", f"output {out.output!r} has rank {rank}; expected 1 or 2"
            )
        columns.append((fetch.index(out.output), column))
    model = LoadedModel(
        spec=spec,
        session=session,
        assembler=FeatureAssembler(spec),
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        fetch=fetch,
        columns=columns,
    )
    _check_test_vector(model)
    return model


def _check_test_vector(model: LoadedModel) -> None:
    spec = model.spec
    vector = spec.test_vector
    row = (
        [float("nan") if v is None else float(v) for v in vector["features"]]
        if vector is not None
        else model.assembler.defaults()
    )
    try:
        scores = model.run_one(row)
    except Exception as exc:
        raise InvalidArgument(
            "spec.test_vector" if vector is not None else "onnx",
            f"running the {'test vector' if vector is not None else 'default feature vector'} failed: "
            f"{str(exc).splitlines()[0][:300]}",
        ) from None
    for name, value in zip(spec.score_names, scores, strict=True):
        if not math.isfinite(value):
            raise InvalidArgument(
                "spec.test_vector" if vector is not None else "onnx",
                f"score {name!r} is {value} on the {'test vector' if vector is not None else 'default features'}",
            )
    if vector is not None:
        tolerance = float(vector.get("tolerance", 1e-4))
        for name, expected in vector.get("expected", {}).items():
            got = scores[spec.score_names.index(name)]
            if abs(got - float(expected)) > tolerance * max(1.0, abs(float(expected))):
                raise InvalidArgument(
                    f"spec.test_vector.expected.{name}",
                    f"the model gives {got:.6g} on the test vector, the spec expects {float(expected):.6g} "
                    f"(tolerance {tolerance:g}): the file and its spec do not belong together",
                )
