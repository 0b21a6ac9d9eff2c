"""cdp scoring: ONNX models over profile fields, online per profile change and in batch."""
