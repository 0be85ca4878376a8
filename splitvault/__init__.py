"""splitvault: split-inference model server that keeps a trained model from being stolen through its API."""
