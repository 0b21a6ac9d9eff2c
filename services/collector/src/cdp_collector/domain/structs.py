"""Decoded JSON → google.protobuf.Struct, refusing what a Struct cannot hold faithfully.

A Struct stores every number as a double, so an integer beyond ±2^53 would come back as a different
integer (order 12345678901234567891 → 12345678901234567168). Changing a customer's data without a word is
not acceptable, so such an integer rejects the event with `integer_out_of_range`, naming the field, and the
client is told to send it as a string. (The JSON decoder turns integer literals beyond 64 bits into floats;
`segment.py` re-decodes those rare bodies exactly so they are caught here too.)

This walk also enforces the nesting limit. It is iterative — a deep payload costs a longer list, not
Python recursion — and it is `Struct.update` without its per-value recursion, which makes it the faster
of the two on the hot path.
"""

from __future__ import annotations

from google.protobuf.struct_pb2 import Struct

from cdp_collector.domain.errors import Code, FieldError, join

MAX_SAFE_INTEGER = 2**53


def fill_struct(struct: Struct, mapping: dict, *, depth: int, path: str, max_depth: int) -> FieldError | None:
    """Copy `mapping` into `struct`. `depth` is the nesting level of `mapping` itself (the event object is
    level 1, so `properties` is 2); `path` names it in errors. Returns the first problem, leaving `struct`
    partly filled: the caller drops the event then."""
    if depth > max_depth:
        return too_deep(path, max_depth)
    stack: list[tuple[object, object, int, str]] = [(mapping, struct.fields, depth, path)]
    pop = stack.pop
    push = stack.append
    limit = MAX_SAFE_INTEGER
    while stack:
        source, target, level, where = pop()
        # Containers inside `source` sit one level deeper; refuse them before descending, empty or not.
        deeper = level < max_depth
        if type(source) is dict:
            # The map's get_or_create, bound once, is a fifth cheaper than `target[key]` (upb, per value).
            entry = target.get_or_create  # type: ignore[attr-defined]
            for key, value in source.items():
                kind = type(value)
                if kind is str:
                    entry(key).string_value = value
                elif kind is float:
                    entry(key).number_value = value
                elif kind is int:
                    if -limit <= value <= limit:
                        entry(key).number_value = value
                    else:
                        return _unsafe_integer(join(where, key), value)
                elif kind is bool:
                    entry(key).bool_value = value
                elif value is None:
                    entry(key).null_value = 0
                elif kind is dict or kind is list:
                    if not deeper:
                        return too_deep(join(where, key), max_depth)
                    if kind is dict:
                        if value:
                            push((value, entry(key).struct_value.fields, level + 1, join(where, key)))
                        else:
                            entry(key).struct_value.SetInParent()
                    elif value:
                        push((value, entry(key).list_value.values, level + 1, join(where, key)))
                    else:
                        entry(key).list_value.SetInParent()
        else:
            add = target.add  # type: ignore[attr-defined]
            for index, value in enumerate(source):  # type: ignore[arg-type]
                kind = type(value)
                if kind is str:
                    add().string_value = value
                elif kind is float:
                    add().number_value = value
                elif kind is int:
                    if -limit <= value <= limit:
                        add().number_value = value
                    else:
                        return _unsafe_integer(f"{where}[{index}]", value)
                elif kind is bool:
                    add().bool_value = value
                elif value is None:
                    add().null_value = 0
                elif kind is dict or kind is list:
                    if not deeper:
                        return too_deep(f"{where}[{index}]", max_depth)
                    if kind is dict:
                        if value:
                            push((value, add().struct_value.fields, level + 1, f"{where}[{index}]"))
                        else:
                            add().struct_value.SetInParent()
                    elif value:
                        push((value, add().list_value.values, level + 1, f"{where}[{index}]"))
                    else:
                        add().list_value.SetInParent()
    return None


def too_deep(where: str, max_depth: int) -> FieldError:
    return FieldError(
        Code.NESTING_TOO_DEEP,
        where,
        f"objects and arrays nest deeper than {max_depth} levels here (the event object is level 1): flatten the data",
    )


def _unsafe_integer(where: str, value: int) -> FieldError:
    return FieldError(
        Code.INTEGER_OUT_OF_RANGE,
        where,
        f"an integer of {len(str(abs(value)))} digits is beyond ±{MAX_SAFE_INTEGER} (2^53), the largest a JSON/Struct "
        "number holds exactly; "
        "send it as a string",
    )
