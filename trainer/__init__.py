"""Training: MNIST-layout data -> Keras MLP -> verified, self-describing ONNX model."""
