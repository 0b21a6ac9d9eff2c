"""cdp's condition language (the segment language): plain Python and NumPy, no I/O.

- `nodes`: the syntax tree both written forms map onto; `text`: `parse` / `to_text`; `tree`: `from_json` /
  `to_json`; `values`: what values mean; `compiler`: `compile_segment`; `plan`, `row`, `vector`, `columns`:
  the compiled form and its per-profile and vectorised evaluators.
"""
