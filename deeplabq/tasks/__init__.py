"""The jobs: train, evaluate, convert and compare. The entry points (train.py, evaluate.py, convert.py,
compare.py) each call one of them; each turns the composed config into typed specs once and drives the
libraries below (data, model, checkpoints, quantization, quant_modes, export, evaluation, reporting,
tracking). Nothing below imports a task."""
