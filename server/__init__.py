"""The engines behind the Triton model, the Triton adapter itself (triton/model.py) and the launcher."""
