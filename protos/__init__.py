"""Generated gRPC code for the public/private tier contract (``inference.proto``).

Regenerate with ``python -m grpc_tools.protoc -I . --python_out=. --mypy_out=. --mypy_grpc_out=.
--grpc_python_out=. protos/inference.proto``; never edit the generated files by hand.
"""
