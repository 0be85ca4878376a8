"""Generated gRPC code for the public/private tier contract (``inference.proto``) and the
Open Inference Protocol v2 messages the public tier's gRPC ingress speaks (``open_inference.proto``).

Regenerate with ``python -m grpc_tools.protoc -I . --python_out=. --mypy_out=. --mypy_grpc_out=.
--grpc_python_out=. protos/inference.proto`` and ``python -m grpc_tools.protoc -I .
--python_out=. --mypy_out=. protos/open_inference.proto`` (messages only: the service is
registered by ``public_api/grpc_ingress.py``); never edit the generated files by hand.
"""
