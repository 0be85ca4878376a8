"""The demo models: a digits CNN trained in seconds and the pretrained all-MiniLM-L6-v2."""
