"""Code both tiers use: errors, tensor codec, manifests, encryption, key providers, layout."""
