"""The committed digits feature network (config.json + model.safetensors); a package so it ships as package data."""
