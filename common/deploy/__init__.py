"""Deployment: a network handed to a serving runtime (ONNX, each framework's own format), every
artefact checked against the float64 oracle in a fresh process, ONNX read back into canonical
weights, ONNX Runtime as a fifth runtime, and int8 for serving. Importing it imports no framework."""
