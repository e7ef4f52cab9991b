"""gRPC serving of the ONNX model with dynamic batching on onnxruntime."""
